//! Generation streams made by a task: the task reads the backend's answer and sends events into
//! a bounded channel whose receiver is the stream. When the stream is dropped (the caller went
//! away) the task ends, dropping the backend's response, which closes the connection: the
//! backend stops generating.

use std::future::Future;

use kowalski_exo_common::proto::GenerateEvent;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{BackendError, GenerationStream};

/// Events buffered before a slow reader holds the backend back.
const BUFFER: usize = 32;

/// The task's end of a generation stream.
pub struct Sink {
    events: mpsc::Sender<Result<GenerateEvent, BackendError>>,
}

impl Sink {
    /// Sends an event; false when nobody reads the stream any more.
    pub async fn send(&self, event: GenerateEvent) -> bool {
        self.events.send(Ok(event)).await.is_ok()
    }

    /// Completes when nobody reads the stream any more.
    pub async fn closed(&self) {
        self.events.closed().await
    }
}

/// A stream fed by `produce`, which ends it with an error by returning one.
pub fn spawn_stream<F, Fut>(produce: F) -> GenerationStream
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = Result<(), BackendError>> + Send + 'static,
{
    let (events, receiver) = mpsc::channel(BUFFER);
    let errors = events.clone();
    let task = produce(Sink { events });
    tokio::spawn(async move {
        if let Err(error) = task.await {
            let _ = errors.send(Err(error)).await;
        }
    });
    Box::pin(ReceiverStream::new(receiver))
}
