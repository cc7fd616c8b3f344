//! The byte-bounded queue of frames between UDP ingress and the TCP writer.

use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::framing::{self, Framing};

/// Frames waiting for the TCP writer, bounded in bytes. Producers never wait.
#[derive(Debug)]
pub struct FrameQueue {
    buf: Mutex<BytesMut>,
    ready: Notify,
    cap: usize,
    framing: Framing,
}

impl FrameQueue {
    /// A queue of at most `cap` bytes of `framing` frames.
    pub fn new(framing: Framing, cap: usize) -> Self {
        FrameQueue {
            buf: Mutex::new(BytesMut::with_capacity(cap.min(1 << 20))),
            ready: Notify::new(),
            cap,
            framing,
        }
    }

    /// Appends a frame; `false` if it does not fit (or is too long to frame): dropped.
    pub fn push(&self, source: SocketAddr, payload: &[u8]) -> bool {
        let need = self.framing.header_len() + payload.len();
        {
            let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            if b.len() + need > self.cap
                || framing::encode(self.framing, source, payload, &mut b).is_err()
            {
                return false;
            }
        }
        self.ready.notify_one();
        true
    }

    /// Waits for frames and swaps them into `out` (which must be empty).
    pub async fn take(&self, out: &mut BytesMut) {
        loop {
            {
                let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
                if !b.is_empty() {
                    std::mem::swap(&mut *b, out);
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Drops whatever is queued; returns how many bytes.
    pub fn clear(&self) -> usize {
        let mut b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let n = b.len();
        b.clear();
        n
    }
}
