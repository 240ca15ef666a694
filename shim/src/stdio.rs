//! Copies between containerd's FIFOs and the agent's process streams.
//!
//! containerd's ExecSync waits until the shim has opened *and closed* both the stdout
//! and stderr FIFOs, so each output FIFO is opened even when the process writes
//! nothing, and closed as soon as the agent reports the end of the stream.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::agent::{Agent, OutputStream, ProcessId};

/// The FIFO paths containerd gave for one process (empty = not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO.
    pub stderr: String,
    /// Whether the process runs on a terminal.
    pub terminal: bool,
}

/// The copy tasks of one process.
#[derive(Debug)]
pub struct StdioCopy {
    outputs: Vec<JoinHandle<()>>,
    stdin_closed: Arc<Notify>,
}

impl StdioCopy {
    /// Starts copying. Output copiers end at the end of their stream; the stdin copier
    /// ends on [`StdioCopy::close_stdin`] or at EOF.
    pub fn start(agent: Arc<dyn Agent>, id: ProcessId, paths: &StdioPaths) -> StdioCopy {
        let mut outputs = Vec::new();
        let streams = [
            (paths.stdout.clone(), OutputStream::Stdout),
            // On a terminal the agent sends everything on stdout.
            (paths.stderr.clone(), OutputStream::Stderr),
        ];
        for (path, stream) in streams {
            if path.is_empty() || (paths.terminal && stream == OutputStream::Stderr) {
                continue;
            }
            outputs.push(tokio::spawn(copy_output(
                agent.clone(),
                id.clone(),
                stream,
                PathBuf::from(path),
            )));
        }
        let stdin_closed = Arc::new(Notify::new());
        if !paths.stdin.is_empty() {
            tokio::spawn(copy_stdin(
                agent,
                id,
                PathBuf::from(&paths.stdin),
                stdin_closed.clone(),
            ));
        }
        StdioCopy {
            outputs,
            stdin_closed,
        }
    }

    /// Stops forwarding stdin and closes the process's stdin (containerd's CloseIO).
    pub fn close_stdin(&self) {
        self.stdin_closed.notify_one();
    }

    /// Waits until every output stream has been copied and its FIFO closed.
    pub async fn wait_outputs(&mut self) {
        for handle in self.outputs.drain(..) {
            let _ = handle.await;
        }
    }
}

async fn copy_output(agent: Arc<dyn Agent>, id: ProcessId, stream: OutputStream, path: PathBuf) {
    // containerd holds the read side open, so this open does not block for long.
    let mut fifo = match tokio::fs::OpenOptions::new().write(true).open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(fifo = %path.display(), error = %e, "cannot open output FIFO");
            return;
        }
    };
    loop {
        match agent.read_output(&id, stream).await {
            Ok(Some(data)) => {
                if let Err(e) = fifo.write_all(&data).await {
                    tracing::debug!(fifo = %path.display(), error = %e, "output FIFO closed by reader");
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(?stream, error = %e, "reading process output failed");
                break;
            }
        }
    }
    let _ = fifo.flush().await;
    // Dropping `fifo` closes it: that is what containerd waits for.
}

async fn copy_stdin(agent: Arc<dyn Agent>, id: ProcessId, path: PathBuf, closed: Arc<Notify>) {
    // Opened read-write so that the FIFO never reads EOF just because containerd has
    // not opened its write side yet; CloseIO ends the copy.
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path);
    let mut receiver = match receiver {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(fifo = %path.display(), error = %e, "cannot open stdin FIFO");
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            _ = closed.notified() => break,
            read = receiver.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut sent = 0;
                    while sent < n {
                        match agent.write_stdin(&id, &buf[sent..n]).await {
                            Ok(0) | Err(_) => {
                                let _ = agent.close_stdin(&id).await;
                                return;
                            }
                            Ok(w) => sent += w,
                        }
                    }
                }
            }
        }
    }
    let _ = agent.close_stdin(&id).await;
}
