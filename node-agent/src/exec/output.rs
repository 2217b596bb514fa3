//! The event stream of one run: sequence numbers, the output cap shared by all its stages, and
//! sends that give way to the deadline and to cancellation while a slow client holds them up.

use kowalski_exo_common::proto::{self, ExecEvent, exec_event::Event};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// Where a run's events go (the gRPC response stream).
pub type EventSender = mpsc::Sender<Result<ExecEvent, Status>>;

/// Why a run stopped before its program ended by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interruption {
    Timeout,
    OutputLimit,
    Cancelled,
}

/// Output bookkeeping for one run.
pub struct RunOutput {
    events: EventSender,
    cancel: CancellationToken,
    deadline: Instant,
    cap: u64,
    sent: u64,
    dropped: u64,
    next_seq: u64,
}

impl RunOutput {
    pub fn new(
        events: EventSender,
        cancel: CancellationToken,
        deadline: Instant,
        cap: u64,
    ) -> Self {
        RunOutput {
            events,
            cancel,
            deadline,
            cap,
            sent: 0,
            dropped: 0,
            next_seq: 0,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Output bytes read past the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Completes when the caller has gone away (the response stream was dropped).
    pub async fn caller_gone(&self) {
        self.events.closed().await
    }

    /// Sends an event, unless the deadline passes or the run is cancelled first.
    pub async fn send(&self, event: Event) -> Result<(), Interruption> {
        let message = Ok(ExecEvent { event: Some(event) });
        tokio::select! {
            sent = self.events.send(message) => sent.map_err(|_| Interruption::Cancelled),
            _ = self.cancel.cancelled() => Err(Interruption::Cancelled),
            _ = tokio::time::sleep_until(self.deadline) => Err(Interruption::Timeout),
        }
    }

    /// Forwards bytes a process wrote, within the cap. Past the cap the rest is counted as
    /// dropped and `OutputLimit` is returned so the run gets killed.
    pub async fn output(
        &mut self,
        stream: proto::OutputStream,
        data: &[u8],
    ) -> Result<(), Interruption> {
        if self.sent >= self.cap {
            self.dropped += data.len() as u64;
            return Err(Interruption::OutputLimit);
        }
        let room = (self.cap - self.sent).min(data.len() as u64) as usize;
        let over = room < data.len();
        self.dropped += (data.len() - room) as u64;
        self.sent += room as u64;
        if room > 0 {
            let chunk = proto::OutputChunk {
                stream: stream as i32,
                data: data[..room].to_vec(),
                seq: self.next_seq,
            };
            self.next_seq += 1;
            self.send(Event::Output(chunk)).await?;
        }
        if over {
            Err(Interruption::OutputLimit)
        } else {
            Ok(())
        }
    }

    /// Counts bytes read after the run was stopped, which are not sent.
    pub fn discard(&mut self, len: usize) {
        self.dropped += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run_output(cap: u64) -> (RunOutput, mpsc::Receiver<Result<ExecEvent, Status>>) {
        let (tx, rx) = mpsc::channel(16);
        let deadline = Instant::now() + Duration::from_secs(60);
        (
            RunOutput::new(tx, CancellationToken::new(), deadline, cap),
            rx,
        )
    }

    fn chunk(event: Result<ExecEvent, Status>) -> proto::OutputChunk {
        match event.unwrap().event {
            Some(Event::Output(chunk)) => chunk,
            other => panic!("expected output, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn output_past_the_cap_is_cut_counted_and_stops_the_run() {
        let (mut out, mut rx) = run_output(10);
        assert_eq!(
            out.output(proto::OutputStream::Stdout, b"123456").await,
            Ok(())
        );
        assert_eq!(
            out.output(proto::OutputStream::Stderr, b"abcdefgh").await,
            Err(Interruption::OutputLimit)
        );
        let first = chunk(rx.recv().await.unwrap());
        let second = chunk(rx.recv().await.unwrap());
        assert_eq!((first.seq, first.data.as_slice()), (0, &b"123456"[..]));
        assert_eq!((second.seq, second.data.as_slice()), (1, &b"abcd"[..]));
        assert_eq!(second.stream, proto::OutputStream::Stderr as i32);
        assert_eq!(out.dropped(), 4);
    }

    #[tokio::test]
    async fn a_send_blocked_by_a_slow_caller_gives_way_to_cancellation() {
        let (tx, _rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = RunOutput::new(tx, cancel.clone(), deadline, 1 << 20);
        out.output(proto::OutputStream::Stdout, b"fills the channel")
            .await
            .unwrap();
        cancel.cancel();
        assert_eq!(
            out.output(proto::OutputStream::Stdout, b"blocked").await,
            Err(Interruption::Cancelled)
        );
    }
}
