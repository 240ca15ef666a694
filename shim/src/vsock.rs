//! The hybrid-vsock handshake shared by both backends.
//!
//! Cloud Hypervisor and `vhost-device-vsock` both expose the guest's vsock as a unix
//! socket on the host. The host connects, writes `CONNECT <port>\n` and gets
//! `OK <host-side-port>\n` once a guest process listens on that vsock port; until then
//! the VMM closes the connection (or answers something else), so we retry.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Longest reply line we accept (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;
/// Pause between attempts.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Connects to guest vsock `port` through the hybrid-vsock unix socket at `socket`,
/// retrying until the guest listens or `timeout` passes.
pub async fn connect(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = String::from("no attempt made");
    loop {
        match tokio::time::timeout_at(deadline, try_connect(socket, port)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last_error = e,
            Err(_) => {}
        }
        if tokio::time::Instant::now() + RETRY_DELAY >= deadline {
            tracing::debug!(socket = %socket.display(), port, last_error, "vsock connect gave up");
            return Err(Error::Timeout {
                what: format!(
                    "guest vsock port {port} via {} ({last_error})",
                    socket.display()
                ),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

/// One attempt; the error is a short reason kept for the final message.
async fn try_connect(socket: &Path, port: u32) -> std::result::Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // Read byte by byte: whatever follows the newline belongs to the guest's protocol.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before OK (guest not listening yet)".into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err("reply line too long".into());
        }
    }
    let reply = String::from_utf8_lossy(&line);
    match reply.strip_prefix("OK ") {
        Some(rest) if rest.trim().parse::<u32>().is_ok() => Ok(stream),
        _ => Err(format!("unexpected reply {reply:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A fake VMM socket: refuses `refusals` connections (as a VMM does while nothing
    /// listens in the guest), then answers OK and echoes one line of payload.
    async fn fake_vmm(listener: UnixListener, refusals: usize) -> Vec<String> {
        let mut requests = Vec::new();
        for attempt in 0..=refusals {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut reader = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("read request");
            requests.push(line.clone());
            if attempt < refusals {
                continue; // dropping the stream closes it without a reply
            }
            let mut stream = reader.into_inner();
            stream.write_all(b"OK 1073741824\n").await.expect("reply");
            let mut reader = tokio::io::BufReader::new(stream);
            let mut payload = String::new();
            reader.read_line(&mut payload).await.expect("payload");
            reader
                .get_mut()
                .write_all(payload.as_bytes())
                .await
                .expect("echo");
        }
        requests
    }

    #[tokio::test]
    async fn handshake_retries_until_the_guest_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).expect("bind");
        let vmm = tokio::spawn(fake_vmm(listener, 2));

        let mut stream = connect(&path, 1024, Duration::from_secs(10))
            .await
            .expect("connect");
        stream.write_all(b"hello guest\n").await.expect("write");
        let mut echoed = String::new();
        tokio::io::BufReader::new(&mut stream)
            .read_line(&mut echoed)
            .await
            .expect("read");
        assert_eq!(echoed, "hello guest\n");
        let requests = vmm.await.expect("fake vmm");
        assert_eq!(requests, vec!["CONNECT 1024\n"; 3]);
    }

    #[tokio::test]
    async fn a_bad_reply_is_retried_then_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.write_all(b"ERR nobody home\n").await;
            }
        });
        let err = connect(&path, 1024, Duration::from_millis(500))
            .await
            .expect_err("must time out");
        assert!(err.to_string().contains("unexpected reply"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_socket_times_out() {
        let err = connect(
            Path::new("/nonexistent/vm.vsock"),
            1024,
            Duration::from_millis(300),
        )
        .await
        .expect_err("must time out");
        assert_eq!(
            err.code(),
            containerd_shim::protos::ttrpc::Code::DEADLINE_EXCEEDED
        );
    }
}
