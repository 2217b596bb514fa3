//! The agent's link to its coordinator: the registry stream, while it is attached, carries
//! messages other parts of the agent send (sub-calls from sessions) and brings back their
//! answers. Calls made while detached, or in flight when the stream breaks, fail at once.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use kowalski_exo_common::proto::{AgentMessage, Subcall, SubcallAnswer, agent_message};
use tokio::sync::{mpsc, oneshot};

/// A handle on the registry stream, cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorLink {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Where messages go while the stream is attached.
    outbound: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<SubcallAnswer>>>,
    next_call: AtomicU64,
}

/// The stream is attached while this lives; dropping it fails the calls still waiting.
pub struct Attached {
    link: CoordinatorLink,
}

impl CoordinatorLink {
    /// Sends a sub-call and waits for its answer.
    pub async fn ask(&self, mut subcall: Subcall) -> Result<SubcallAnswer, String> {
        let outbound = self
            .inner
            .outbound
            .lock()
            .expect("link lock poisoned")
            .clone()
            .ok_or("this node is not attached to its coordinator right now")?;
        let call_id = self.inner.next_call.fetch_add(1, Ordering::Relaxed) + 1;
        subcall.call_id = call_id;
        let (answered, answer) = oneshot::channel();
        self.pending().insert(call_id, answered);
        let message = AgentMessage {
            message: Some(agent_message::Message::Subcall(subcall)),
        };
        if outbound.send(message).await.is_err() {
            self.pending().remove(&call_id);
            return Err("the connection to the coordinator broke".to_string());
        }
        answer
            .await
            .map_err(|_| "the connection to the coordinator broke before it answered".to_string())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<SubcallAnswer>>> {
        self.inner.pending.lock().expect("link lock poisoned")
    }

    /// The registry stream is attached: messages go to `outbound` until the guard is dropped.
    pub fn attach(&self, outbound: mpsc::Sender<AgentMessage>) -> Attached {
        *self.inner.outbound.lock().expect("link lock poisoned") = Some(outbound);
        Attached { link: self.clone() }
    }

    /// An answer came down the stream.
    pub fn answered(&self, answer: SubcallAnswer) {
        if let Some(waiting) = self.pending().remove(&answer.call_id) {
            let _ = waiting.send(answer);
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        *self.link.inner.outbound.lock().expect("link lock poisoned") = None;
        // Dropping the senders wakes every waiting call with an error.
        self.link.pending().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_answered_by_id_and_fail_when_detached() {
        let link = CoordinatorLink::default();
        let detached = link.ask(Subcall::default()).await.unwrap_err();
        assert!(detached.contains("not attached"), "{detached}");
        let (outbound, mut sent) = mpsc::channel(4);
        let attached = link.attach(outbound);
        let asking = tokio::spawn({
            let link = link.clone();
            async move { link.ask(Subcall::default()).await }
        });
        let Some(agent_message::Message::Subcall(call)) = sent.recv().await.unwrap().message else {
            panic!("a subcall was sent");
        };
        link.answered(SubcallAnswer {
            call_id: call.call_id,
            error: "answered".into(),
            ..Default::default()
        });
        assert_eq!(asking.await.unwrap().unwrap().error, "answered");
        let waiting = tokio::spawn({
            let link = link.clone();
            async move { link.ask(Subcall::default()).await }
        });
        sent.recv().await.unwrap();
        drop(attached);
        let broke = waiting.await.unwrap().unwrap_err();
        assert!(broke.contains("broke"), "{broke}");
    }
}
