//! The concurrency limit: at most `capacity` runs at once and `queue` more waiting; past that a
//! run is refused at once instead of piling up.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Admission control for runs.
#[derive(Clone, Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    capacity: usize,
    queue: usize,
    /// Runs admitted and not yet finished: running plus queued.
    admitted: Arc<AtomicUsize>,
}

/// Why a run was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub capacity: usize,
    pub queue: usize,
}

/// A place in the queue. Dropping it (the caller went away) frees the place.
#[derive(Debug)]
pub struct Ticket {
    admitted: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
}

/// A running slot; held for the whole run.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
}

impl Admission {
    pub fn new(capacity: usize, queue: usize) -> Self {
        let capacity = capacity.max(1);
        Admission {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            queue,
            admitted: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue
    }

    /// Runs holding a slot now.
    pub fn running(&self) -> usize {
        self.capacity - self.slots.available_permits()
    }

    /// Runs waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.running())
    }

    /// Takes a place, or refuses at once when running and queued runs fill every place.
    pub fn enter(&self) -> Result<Ticket, Full> {
        let limit = self.capacity + self.queue;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| Full {
                capacity: self.capacity,
                queue: self.queue,
            })?;
        Ok(Ticket {
            admitted: self.admitted.clone(),
            slots: self.slots.clone(),
        })
    }
}

impl Ticket {
    /// Waits in the queue for a running slot.
    pub async fn wait_for_slot(self) -> Slot {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the run semaphore is never closed");
        Slot {
            _permit: permit,
            _ticket: self,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_past_capacity_plus_queue_and_frees_places() {
        let admission = Admission::new(1, 1);
        let running = admission.enter().unwrap().wait_for_slot().await;
        let queued = admission.enter().unwrap();
        assert_eq!((admission.running(), admission.queued()), (1, 1));
        assert_eq!(
            admission.enter().unwrap_err(),
            Full {
                capacity: 1,
                queue: 1
            }
        );
        drop(queued);
        assert_eq!(admission.queued(), 0);
        let _queued_again = admission.enter().unwrap();
        drop(running);
        assert_eq!(admission.running(), 0);
    }
}
