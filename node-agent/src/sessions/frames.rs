//! The channel between the agent and a session's interpreter: frames of a header line
//! `KIND ID LENGTH\n` followed by LENGTH bytes of payload, simple enough for a bash driver.
//! Read cancel-safely, with every length bounded: the interpreter runs untrusted code.

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::Mutex,
};

/// Longest header line (kind, id and length).
const MAX_HEADER: usize = 64;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// One frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: String,
    pub id: u64,
    pub payload: Vec<u8>,
}

/// What the interpreter sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    Frame(Frame),
    /// A frame whose payload is over the limit: its bytes were skipped.
    Oversized {
        kind: String,
        id: u64,
        length: u64,
    },
}

/// Reads frames; safe to cancel between awaits (its state lives in `self`).
#[derive(Debug)]
pub struct FrameReader<R> {
    source: R,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts: frames are taken by moving it, and the buffer is
    /// compacted once per read, not once per frame.
    start: usize,
    max_payload: usize,
    /// Payload bytes of an oversized frame still to skip, and its header.
    skipping: Option<(String, u64, u64, u64)>,
}

impl<R: AsyncReadExt + Unpin> FrameReader<R> {
    pub fn new(source: R, max_payload: usize) -> Self {
        FrameReader {
            source,
            buf: Vec::new(),
            start: 0,
            max_payload,
            skipping: None,
        }
    }

    /// The next frame; `None` when the interpreter closed the channel. A malformed header is
    /// an error: the interpreter no longer speaks the protocol.
    pub async fn next(&mut self) -> io::Result<Option<Received>> {
        loop {
            if let Some(received) = self.parse()? {
                return Ok(Some(received));
            }
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.reserve(READ_CHUNK);
            // Cancel-safe: bytes land in the buffer only when the read completes.
            if self.source.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// A whole frame from the buffer, if one is there.
    fn parse(&mut self) -> io::Result<Option<Received>> {
        if let Some((kind, id, length, left)) = self.skipping.take() {
            let skipped = (left as usize).min(self.buf.len() - self.start);
            self.start += skipped;
            let left = left - skipped as u64;
            if left > 0 {
                self.skipping = Some((kind, id, length, left));
                return Ok(None);
            }
            return Ok(Some(Received::Oversized { kind, id, length }));
        }
        let unread = &self.buf[self.start..];
        let Some(newline) = unread.iter().position(|&b| b == b'\n') else {
            if unread.len() > MAX_HEADER {
                return Err(malformed("a header line longer than 64 bytes"));
            }
            return Ok(None);
        };
        let header = std::str::from_utf8(&unread[..newline])
            .map_err(|_| malformed("a header that is not UTF-8"))?;
        let mut fields = header.split(' ');
        let (Some(kind), Some(id), Some(length), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed(&format!("the header '{header}'")));
        };
        let (Ok(id), Ok(length)) = (id.parse::<u64>(), length.parse::<u64>()) else {
            return Err(malformed(&format!("the header '{header}'")));
        };
        let kind = kind.to_string();
        if length > self.max_payload as u64 {
            self.start += newline + 1;
            self.skipping = Some((kind, id, length, length));
            return self.parse();
        }
        let end = newline + 1 + length as usize;
        if unread.len() < end {
            return Ok(None);
        }
        let payload = unread[newline + 1..end].to_vec();
        self.start += end;
        Ok(Some(Received::Frame(Frame { kind, id, payload })))
    }
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the interpreter sent {what} on its channel"),
    )
}

/// Writes frames; shared by the cell loop and the tasks answering sub-calls.
#[derive(Clone, Debug)]
pub struct FrameWriter(Arc<Mutex<OwnedWriteHalf>>);

impl FrameWriter {
    pub fn new(half: OwnedWriteHalf) -> Self {
        FrameWriter(Arc::new(Mutex::new(half)))
    }

    pub async fn send(&self, kind: &str, id: u64, payload: &[u8]) -> io::Result<()> {
        let mut frame = format!("{kind} {id} {}\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        self.0.lock().await.write_all(&frame).await
    }
}

/// The reading half the interpreter's frames arrive on.
pub type ChannelReader = FrameReader<OwnedReadHalf>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames_of(bytes: &[u8], max_payload: usize) -> Vec<io::Result<Option<Received>>> {
        let mut reader = FrameReader::new(bytes, max_payload);
        let mut out = Vec::new();
        loop {
            let next = reader.next().await;
            let stop = !matches!(next, Ok(Some(_)));
            out.push(next);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn frames_are_read_whole_and_oversized_payloads_are_skipped() {
        let bytes = b"done 1 2\nokllm 7 12\n0123456789abready 0 0\n";
        let frames = frames_of(bytes, 10).await;
        let frames: Vec<Option<Received>> = frames.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            frames,
            vec![
                Some(Received::Frame(Frame {
                    kind: "done".into(),
                    id: 1,
                    payload: b"ok".to_vec()
                })),
                Some(Received::Oversized {
                    kind: "llm".into(),
                    id: 7,
                    length: 12
                }),
                Some(Received::Frame(Frame {
                    kind: "ready".into(),
                    id: 0,
                    payload: Vec::new()
                })),
                None,
            ]
        );
    }

    #[tokio::test]
    async fn a_malformed_header_is_an_error_naming_it() {
        let frames = frames_of(b"done one 2\nok", 10).await;
        let err = frames.into_iter().last().unwrap().unwrap_err();
        assert!(err.to_string().contains("'done one 2'"), "{err}");
        let long = [b'x'; 100];
        let err = frames_of(&long, 10)
            .await
            .into_iter()
            .last()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("longer than 64 bytes"), "{err}");
    }
}
