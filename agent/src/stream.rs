//! Bounded byte buffers between a process's output pipe and the ReadStdout/ReadStderr
//! long-poll calls.
//!
//! A reader thread drains the pipe into the buffer (so the process never blocks on a
//! slow client until the buffer is full), and a read call takes whatever is there,
//! waiting for data, for the end of the stream, or for a timeout.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How much output the agent holds per stream before the process blocks on writes.
pub const BUFFER_CAPACITY: usize = 1 << 20;

/// Default upper bound of one read.
pub const DEFAULT_READ_BYTES: usize = 64 << 10;

#[derive(Debug, Default)]
struct State {
    data: VecDeque<u8>,
    /// The writer side has ended.
    eof: bool,
    /// Nobody will read any more: drop incoming data instead of blocking.
    discarded: bool,
}

/// One output stream of a process.
#[derive(Debug, Default)]
pub struct OutputBuffer {
    state: Mutex<State>,
    changed: Condvar,
}

/// What one read returned.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Bytes, possibly empty when the read timed out.
    pub data: Vec<u8>,
    /// The stream has ended and all of it has been read.
    pub eof: bool,
}

impl OutputBuffer {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread cannot leave the byte queue inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends output, waiting while the buffer is full.
    pub fn push(&self, mut bytes: &[u8]) {
        let mut state = self.lock();
        while !bytes.is_empty() {
            if state.discarded {
                return;
            }
            let room = BUFFER_CAPACITY.saturating_sub(state.data.len());
            if room == 0 {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let take = room.min(bytes.len());
            state.data.extend(&bytes[..take]);
            bytes = &bytes[take..];
            self.changed.notify_all();
        }
    }

    /// Marks the end of the stream.
    pub fn close(&self) {
        self.lock().eof = true;
        self.changed.notify_all();
    }

    /// Ends the stream and drops buffered and future output (the process is deleted).
    pub fn discard(&self) {
        let mut state = self.lock();
        state.discarded = true;
        state.eof = true;
        state.data.clear();
        self.changed.notify_all();
    }

    /// Takes up to `max` bytes, waiting up to `timeout` for at least one byte or the end.
    pub fn read(&self, max: usize, timeout: Duration) -> Chunk {
        let max = if max == 0 { DEFAULT_READ_BYTES } else { max };
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.data.is_empty() && !state.eof {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let take = max.min(state.data.len());
        let data: Vec<u8> = state.data.drain(..take).collect();
        if take > 0 {
            self.changed.notify_all();
        }
        Chunk {
            eof: state.eof && state.data.is_empty(),
            data,
        }
    }

    /// Copies `source` into the buffer until it ends, then closes the buffer.
    ///
    /// EIO ends the stream too: that is how a pty master reports the slave side closed.
    pub fn fill_from(&self, mut source: impl Read) {
        let mut chunk = vec![0u8; 16 << 10];
        loop {
            match source.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.push(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn reads_data_then_eof() {
        let buffer = OutputBuffer::default();
        buffer.push(b"hello world");
        buffer.close();
        let first = buffer.read(5, Duration::ZERO);
        assert_eq!(
            first,
            Chunk {
                data: b"hello".to_vec(),
                eof: false
            }
        );
        let rest = buffer.read(0, Duration::ZERO);
        assert_eq!(
            rest,
            Chunk {
                data: b" world".to_vec(),
                eof: true
            }
        );
        assert_eq!(
            buffer.read(0, Duration::ZERO),
            Chunk {
                data: vec![],
                eof: true
            }
        );
    }

    #[test]
    fn an_empty_open_stream_times_out_empty() {
        let buffer = OutputBuffer::default();
        let chunk = buffer.read(0, Duration::from_millis(20));
        assert_eq!(
            chunk,
            Chunk {
                data: vec![],
                eof: false
            }
        );
    }

    #[test]
    fn a_full_buffer_blocks_the_writer_until_read() {
        let buffer = Arc::new(OutputBuffer::default());
        let writer = {
            let buffer = Arc::clone(&buffer);
            std::thread::spawn(move || {
                buffer.fill_from(&vec![7u8; BUFFER_CAPACITY + 10][..]);
            })
        };
        let mut total = 0;
        loop {
            let chunk = buffer.read(0, Duration::from_secs(5));
            total += chunk.data.len();
            if chunk.eof {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(total, BUFFER_CAPACITY + 10);
    }

    #[test]
    fn discard_unblocks_writer_and_reader() {
        let buffer = OutputBuffer::default();
        buffer.push(b"x");
        buffer.discard();
        buffer.push(&vec![0u8; BUFFER_CAPACITY * 2]);
        assert_eq!(
            buffer.read(0, Duration::from_secs(5)),
            Chunk {
                data: vec![],
                eof: true
            }
        );
    }
}
