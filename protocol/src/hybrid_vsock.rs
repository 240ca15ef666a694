//! The host side of a hybrid vsock: a unix socket on which `CONNECT <port>\n` opens a
//! stream to a guest vsock port (Cloud Hypervisor, Firecracker, `vhost-device-vsock`).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors of the hybrid-vsock handshake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The unix socket could not be reached or the exchange failed.
    #[error("hybrid vsock socket {path} failed")]
    Io {
        /// The host-side unix socket.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The VMM answered something other than `OK <port>`.
    #[error("hybrid vsock socket {path} refused CONNECT {port}: {reply:?}")]
    Refused {
        /// The host-side unix socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// What the VMM answered (possibly empty when it closed the connection).
        reply: String,
    },
    /// The guest did not listen on the port before the deadline.
    #[error("guest did not accept vsock port {port} on {path} within {timeout:?}")]
    Timeout {
        /// The host-side unix socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// How long we kept trying.
        timeout: Duration,
        /// The last failure seen.
        #[source]
        last: Box<Error>,
    },
}

/// Result of the hybrid-vsock helpers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Connects once: opens `path`, sends `CONNECT <port>\n` and reads the `OK <port>` line.
///
/// On success the returned stream talks to the guest's listener directly.
pub fn connect(path: &Path, port: u32) -> Result<UnixStream> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    // A VMM that never answers must not hang us forever.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err)?;
    // Read byte by byte: anything after the newline already belongs to the guest.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < 64 {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => reply.push(byte[0]),
            Err(e) => return Err(io_err(e)),
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if !reply.starts_with("OK ") {
        return Err(Error::Refused {
            path: path.to_path_buf(),
            port,
            reply,
        });
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    Ok(stream)
}

/// Retries [`connect`] every `interval` until the guest accepts or `timeout` passes.
///
/// The VMM answers nothing (or closes) until a guest process listens on the port,
/// so right after boot the first attempts are expected to fail.
pub fn connect_with_retry(
    path: &Path,
    port: u32,
    timeout: Duration,
    interval: Duration,
) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match connect(path, port) {
            Ok(stream) => return Ok(stream),
            Err(last) if start.elapsed() >= timeout => {
                return Err(Error::Timeout {
                    path: path.to_path_buf(),
                    port,
                    timeout,
                    last: Box::new(last),
                });
            }
            Err(_) => std::thread::sleep(interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A fake VMM that answers `OK <port>` and then echoes one line.
    #[test]
    fn handshake_passes_through_to_the_guest_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        let listener = UnixListener::bind(&path).unwrap();
        let vmm = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            (&stream).write_all(b"OK 1024\nguest-bytes").unwrap();
        });
        let mut stream = connect(&path, 1024).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "guest-bytes");
        vmm.join().unwrap();
    }

    #[test]
    fn a_closed_connection_is_a_refusal_and_retry_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        // Depending on timing the closed connection shows as an empty reply or as a
        // failed write; both are failures the retry loop rides out.
        let err = connect(&path, 7).unwrap_err();
        assert!(
            matches!(err, Error::Refused { port: 7, .. } | Error::Io { .. }),
            "{err}"
        );
        let err = connect_with_retry(
            &path,
            7,
            Duration::from_millis(50),
            Duration::from_millis(10),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
    }
}
