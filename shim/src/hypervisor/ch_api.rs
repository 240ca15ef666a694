//! Cloud Hypervisor's two control channels, as the shim uses them:
//!
//! - the REST API on `--api-socket` (HTTP/1.1 over a unix socket): [`ApiClient`], where
//!   every call is bounded by a timeout, so a wedged VMM becomes an error that names the
//!   call instead of a hung shim;
//! - the `--event-monitor` stream (pretty-printed JSON objects): [`EventReader`], from
//!   which a guest's reset or panic is read as the end of the VM ([`GuestEnd`]).
//!   Cloud Hypervisor reboots a guest that resets, and only reports a pvpanic; the shim
//!   turns both into the VM's exit, as QEMU's `-no-reboot` does.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// How long an ordinary REST call (`vm.info`, `vm.shutdown`, …) may take.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

/// The timeout error for `what`, rounded up to whole seconds (the error's unit).
fn timeout_error(what: String, timeout: Duration) -> Error {
    Error::Timeout {
        what,
        secs: timeout.as_secs_f64().ceil() as u64,
    }
}

/// Client for the REST API on one unix socket. Calls are serialized by one mutex (one
/// request in flight, as Kata does), and each is bounded by a timeout, the wait for the
/// mutex included.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
    lock: tokio::sync::Mutex<()>,
}

impl ApiClient {
    /// A client for the API socket at `socket` with [`DEFAULT_API_TIMEOUT`] (nothing is
    /// opened yet).
    pub fn new(socket: PathBuf) -> ApiClient {
        ApiClient {
            socket,
            timeout: DEFAULT_API_TIMEOUT,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The same client with `timeout` as its default per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// The API socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT /api/v1/<endpoint>` with an optional JSON body, within the default timeout;
    /// returns the response body.
    pub async fn put(&self, endpoint: &str, body: Option<&serde_json::Value>) -> Result<Bytes> {
        self.put_within(endpoint, body, self.timeout).await
    }

    /// [`ApiClient::put`] within `timeout` (`vm.create` of a large, prefaulted VM takes
    /// longer than the default).
    pub async fn put_within(
        &self,
        endpoint: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<Bytes> {
        let body = match body {
            Some(value) => Bytes::from(serde_json::to_vec(value).map_err(|e| {
                Error::Hypervisor(format!("cannot encode the {endpoint} body: {e}"))
            })?),
            None => Bytes::new(),
        };
        self.request(hyper::Method::PUT, endpoint, body, timeout)
            .await
    }

    /// `GET /api/v1/<endpoint>`, within the default timeout.
    pub async fn get(&self, endpoint: &str) -> Result<Bytes> {
        self.request(hyper::Method::GET, endpoint, Bytes::new(), self.timeout)
            .await
    }

    /// `GET /api/v1/<endpoint>`, parsed as JSON.
    pub async fn get_json(&self, endpoint: &str) -> Result<serde_json::Value> {
        let body = self.get(endpoint).await?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Hypervisor(format!("{endpoint} answered invalid JSON: {e}")))
    }

    async fn request(
        &self,
        method: hyper::Method,
        endpoint: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes> {
        let call = async {
            let _guard = self.lock.lock().await;
            self.exchange(method, endpoint, body).await
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| {
            timeout_error(
                format!(
                    "Cloud Hypervisor to answer {endpoint} on {}",
                    self.socket.display()
                ),
                timeout,
            )
        })?
    }

    /// One request on a fresh connection (Cloud Hypervisor's server closes idle ones).
    async fn exchange(&self, method: hyper::Method, endpoint: &str, body: Bytes) -> Result<Bytes> {
        let hyper_error =
            |e: hyper::Error| Error::Hypervisor(format!("API call {endpoint} failed: {e}"));
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(Error::io(format!(
                "cannot connect to the Cloud Hypervisor API socket {} for {endpoint}",
                self.socket.display()
            )))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(hyper_error)?;
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let has_body = !body.is_empty();
        let mut builder = hyper::Request::builder()
            .method(method)
            // Origin-form: the request goes over a unix socket, Host names the server.
            .uri(format!("/api/v1/{endpoint}"))
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if has_body {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| Error::Hypervisor(format!("cannot build the {endpoint} request: {e}")))?;
        let response = sender.send_request(request).await.map_err(hyper_error)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(hyper_error)?
            .to_bytes();
        drop(driver);
        if !status.is_success() {
            return Err(Error::VmmApi {
                endpoint: endpoint.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).trim().to_owned(),
            });
        }
        Ok(bytes)
    }
}

/// Aborts the connection task when the request ends, timed out or not.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long `vm.create` may take for a VM of `memory_mib`. Cloud Hypervisor touches
/// every page at create time when the memory is prefaulted or pinned for VFIO devices,
/// which takes about a second per GiB on a slow host; anything else is quick.
pub fn create_timeout(memory_mib: u64, touches_all_memory: bool) -> Duration {
    let base = Duration::from_secs(60);
    if touches_all_memory {
        base + Duration::from_secs(memory_mib.div_ceil(1024))
    } else {
        base
    }
}

/// One event from `--event-monitor`: `{"timestamp": …, "source": "vm", "event":
/// "rebooting", "properties": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmmEvent {
    /// `vmm`, `vm`, `guest`, `virtio-device`, …
    pub source: String,
    /// `booted`, `rebooting`, `panic`, `shutdown`, …
    pub event: String,
    /// Extra details, e.g. `{"event": "panic"}` for a pvpanic.
    #[serde(default)]
    pub properties: Option<HashMap<String, String>>,
}

/// Why a guest's VM ends although the guest did not power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest reset itself (Linux does after a panic with `panic=1 reboot=k`).
    Reset,
    /// The guest reported a panic through the pvpanic device.
    Panic,
}

impl VmmEvent {
    /// Whether this event ends the VM: a reset, which Cloud Hypervisor answers with a
    /// reboot (`vm`/`rebooting`), or a pvpanic report (`guest`/`panic`).
    pub fn guest_end(&self) -> Option<GuestEnd> {
        match (self.source.as_str(), self.event.as_str()) {
            ("vm", "rebooting") => Some(GuestEnd::Reset),
            ("guest", "panic") => Some(GuestEnd::Panic),
            _ => None,
        }
    }
}

/// Reads [`VmmEvent`]s from the event-monitor stream, whatever the chunks it arrives in.
#[derive(Debug)]
pub struct EventReader<R> {
    reader: R,
    buffer: Vec<u8>,
    parsed: VecDeque<VmmEvent>,
}

impl<R: AsyncRead + Unpin> EventReader<R> {
    /// Reads events from `reader`.
    pub fn new(reader: R) -> EventReader<R> {
        EventReader {
            reader,
            buffer: Vec::new(),
            parsed: VecDeque::new(),
        }
    }

    /// The next event; `None` once the stream ends.
    pub async fn next(&mut self) -> Result<Option<VmmEvent>> {
        loop {
            if let Some(event) = self.parsed.pop_front() {
                return Ok(Some(event));
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .reader
                .read(&mut chunk)
                .await
                .map_err(Error::io("cannot read Cloud Hypervisor's event monitor"))?;
            if n == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
            self.parse_buffered()?;
        }
    }

    /// Moves every complete JSON object from the buffer to `parsed`, keeping a partial
    /// one for the next read.
    fn parse_buffered(&mut self) -> Result<()> {
        let mut stream = serde_json::Deserializer::from_slice(&self.buffer).into_iter::<VmmEvent>();
        let mut consumed = 0;
        loop {
            match stream.next() {
                Some(Ok(event)) => {
                    consumed = stream.byte_offset();
                    self.parsed.push_back(event);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    return Err(Error::Hypervisor(format!(
                        "Cloud Hypervisor's event monitor wrote an event the shim cannot read: {e}"
                    )));
                }
                None => {
                    consumed = self.buffer.len();
                    break;
                }
            }
        }
        self.buffer.drain(..consumed);
        Ok(())
    }
}

/// Makes the FIFO at `path` that Cloud Hypervisor writes its events to, and opens it for
/// reading. Opened read-write, so that opening never waits for the writer and the
/// stream never sees an end of file while the VMM restarts its writer; the caller
/// stops reading when the VMM exits.
pub fn open_event_fifo(path: &Path) -> Result<EventReader<tokio::net::unix::pipe::Receiver>> {
    nix::unistd::mkfifo(
        path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|errno| Error::Io {
        context: format!("cannot create the event FIFO {}", path.display()),
        source: std::io::Error::from(errno),
    })?;
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(Error::io(format!(
            "cannot open the event FIFO {}",
            path.display()
        )))?;
    Ok(EventReader::new(receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake API socket answering like Cloud Hypervisor: records each request line
    /// and body, answers from `replies` in order.
    async fn fake_api(
        listener: tokio::net::UnixListener,
        replies: Vec<&'static str>,
    ) -> Vec<(String, String)> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let mut seen = Vec::new();
        for reply in replies {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader
                .read_line(&mut request_line)
                .await
                .expect("request line");
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).await.expect("header");
                if header == "\r\n" {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().expect("length");
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).await.expect("body");
            seen.push((
                request_line.trim().to_owned(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            reader
                .get_mut()
                .write_all(reply.as_bytes())
                .await
                .expect("reply");
        }
        seen
    }

    #[tokio::test]
    async fn api_client_speaks_http_over_the_unix_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let info = r#"{"config":{"payload":{}},"state":"Running"}"#;
        let ok_info: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{info}",
                info.len()
            )
            .into_boxed_str(),
        );
        let server = tokio::spawn(fake_api(
            listener,
            vec![
                "HTTP/1.1 204 No Content\r\n\r\n",
                ok_info,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 12\r\n\r\nVM not boots",
            ],
        ));
        let api = ApiClient::new(socket);
        let body = serde_json::json!({"payload": {"kernel": "/k"}});
        api.put("vm.create", Some(&body)).await.expect("create");
        let reply = api.get_json("vm.info").await.expect("info");
        assert_eq!(reply["state"], "Running");
        let err = api.put("vm.boot", None).await.expect_err("500");
        match err {
            Error::VmmApi {
                endpoint,
                status,
                body,
            } => {
                assert_eq!(
                    (endpoint.as_str(), status, body.as_str()),
                    ("vm.boot", 500, "VM not boots")
                );
            }
            other => panic!("expected VmmApi, got {other}"),
        }
        let seen = server.await.expect("server");
        assert_eq!(seen[0].0, "PUT /api/v1/vm.create HTTP/1.1");
        assert_eq!(seen[0].1, r#"{"payload":{"kernel":"/k"}}"#);
        assert_eq!(seen[1].0, "GET /api/v1/vm.info HTTP/1.1");
        assert_eq!(
            seen[2],
            ("PUT /api/v1/vm.boot HTTP/1.1".to_owned(), String::new())
        );
    }

    #[tokio::test]
    async fn a_vmm_that_never_answers_is_a_timeout_that_names_the_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        // Accepts and reads, never answers: a wedged VMM.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                held.push(stream);
            }
        });
        let api = ApiClient::new(socket).with_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = api.put("vm.shutdown", None).await.expect_err("timeout");
        assert!(started.elapsed() < Duration::from_secs(5), "{err}");
        match &err {
            Error::Timeout { what, secs } => {
                assert!(what.contains("vm.shutdown"), "{err}");
                assert!(what.contains("api.sock"), "{err}");
                assert_eq!(*secs, 1);
            }
            other => panic!("expected Timeout, got {other}"),
        }
        // A longer budget for one call still ends at its own timeout.
        let err = api
            .put_within("vm.create", None, Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert!(err.to_string().contains("vm.create"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_error_that_names_socket_and_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = ApiClient::new(dir.path().join("gone.sock"));
        let err = api.get("vm.info").await.expect_err("no socket");
        let message = err.full_message();
        assert!(matches!(err, Error::Io { .. }), "{message}");
        assert!(
            message.contains("gone.sock") && message.contains("vm.info"),
            "{message}"
        );
    }

    #[test]
    fn create_timeout_grows_with_memory_only_when_it_is_touched() {
        let cases = [
            (1024, false, 60),
            (2 << 20, false, 60),
            (1024, true, 61),
            (1536, true, 62),
            (2 << 20, true, 60 + 2048),
        ];
        for (mib, touched, secs) in cases {
            assert_eq!(
                create_timeout(mib, touched),
                Duration::from_secs(secs),
                "{mib} MiB, touched: {touched}"
            );
        }
    }

    /// Events as Cloud Hypervisor writes them: pretty JSON, a blank line after each.
    const EVENTS: &str = r#"{
  "timestamp": {
    "secs": 0,
    "nanos": 8100
  },
  "source": "vmm",
  "event": "starting",
  "properties": null
}

{
  "timestamp": {
    "secs": 0,
    "nanos": 301200
  },
  "source": "vm",
  "event": "booted",
  "properties": null
}

{
  "timestamp": {
    "secs": 1,
    "nanos": 5
  },
  "source": "guest",
  "event": "panic",
  "properties": {
    "event": "panic"
  }
}

"#;

    /// Hands out `data` in chunks of `size` bytes, one per read.
    struct Chunked {
        data: Vec<u8>,
        size: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.size.min(self.data.len()).min(buf.remaining());
            let chunk: Vec<u8> = self.data.drain(..n).collect();
            buf.put_slice(&chunk);
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn events_are_read_whatever_the_chunking() {
        for size in [1, 7, 64, 4096] {
            let mut reader = EventReader::new(Chunked {
                data: EVENTS.as_bytes().to_vec(),
                size,
            });
            let mut seen = Vec::new();
            while let Some(event) = reader.next().await.expect("event") {
                seen.push(event);
            }
            let names: Vec<(&str, &str)> = seen
                .iter()
                .map(|e| (e.source.as_str(), e.event.as_str()))
                .collect();
            assert_eq!(
                names,
                [("vmm", "starting"), ("vm", "booted"), ("guest", "panic")],
                "chunks of {size}"
            );
            assert_eq!(
                seen[2].properties.as_ref().and_then(|p| p.get("event")),
                Some(&"panic".to_owned())
            );
        }
    }

    #[tokio::test]
    async fn a_garbled_event_is_an_error() {
        let mut reader = EventReader::new(Chunked {
            data: b"{\"source\": \"vm\", \"event\": 5}\n".to_vec(),
            size: 4096,
        });
        let err = reader.next().await.expect_err("garbled");
        assert!(err.to_string().contains("event monitor"), "{err}");
    }

    #[test]
    fn only_a_reset_or_a_panic_ends_the_vm() {
        let event = |source: &str, name: &str| VmmEvent {
            source: source.into(),
            event: name.into(),
            properties: None,
        };
        let cases = [
            (event("vm", "rebooting"), Some(GuestEnd::Reset)),
            (event("guest", "panic"), Some(GuestEnd::Panic)),
            (event("vm", "rebooted"), None),
            (event("vm", "booted"), None),
            (event("vm", "shutdown"), None),
            (event("vmm", "shutdown"), None),
            (event("virtio-device", "activated"), None),
        ];
        for (event, want) in cases {
            assert_eq!(event.guest_end(), want, "{event:?}");
        }
    }

    #[tokio::test]
    async fn the_event_fifo_streams_what_a_writer_puts_in() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.fifo");
        let mut reader = open_event_fifo(&path).expect("fifo");
        // The writer opens after the reader, as Cloud Hypervisor does, and does not block.
        let mut writer = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(&path)
            .expect("writer");
        // The first event and a part of the second: the first arrives whole, the second
        // waits for the rest.
        let split = EVENTS.find("}\n\n").expect("an event") + 20;
        let (first, rest) = EVENTS.split_at(split);
        writer.write_all(first.as_bytes()).await.expect("write");
        let event = reader.next().await.expect("read").expect("an event");
        assert_eq!(
            (event.source.as_str(), event.event.as_str()),
            ("vmm", "starting")
        );
        writer.write_all(rest.as_bytes()).await.expect("write");
        drop(writer);
        let booted = reader.next().await.expect("read").expect("an event");
        let panic = reader.next().await.expect("read").expect("an event");
        assert_eq!(booted.guest_end(), None);
        assert_eq!(panic.guest_end(), Some(GuestEnd::Panic));
        // The writer closed, but the stream stays open (the reader holds a write end).
        let more = tokio::time::timeout(Duration::from_millis(100), reader.next()).await;
        assert!(more.is_err(), "the stream ended: {more:?}");
        // Making the FIFO twice fails with a message naming it.
        let err = open_event_fifo(&path).expect_err("exists");
        assert!(err.to_string().contains("events.fifo"), "{err}");
    }
}
