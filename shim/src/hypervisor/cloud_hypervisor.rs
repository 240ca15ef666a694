//! Cloud Hypervisor backend: `cloud-hypervisor --api-socket <path>` driven over its
//! REST API (HTTP/1.1 on a unix socket).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixStream;
use tokio::process::Command;

use super::{GUEST_CID, SHARED_FS_TAG, SpawnHook, VmHost, VmSpec, Vmm};
use crate::config::ShimConfig;
use crate::error::{Error, Result};

/// Every REST call the backend makes: (endpoint, HTTP method, has a JSON body). The
/// contract test checks each against Cloud Hypervisor's OpenAPI spec.
pub const API_CALLS: &[(&str, &str, bool)] = &[
    ("vm.create", "put", true),
    ("vm.boot", "put", false),
    ("vm.info", "get", false),
    ("vm.shutdown", "put", false),
    ("vm.delete", "put", false),
    ("vmm.shutdown", "put", false),
];

/// `vm.create` body: the subset of Cloud Hypervisor's `VmConfig` the shim uses.
/// Field names follow `cloud-hypervisor.yaml`; the contract test checks every body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: CpusConfig,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// Kernel, initramfs, command line.
    pub payload: PayloadConfig,
    /// virtio-fs shares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsConfig>,
    /// virtio-net devices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// VFIO devices.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceConfig>,
    /// Hybrid vsock.
    pub vsock: VsockConfig,
    /// Serial port (to a log file).
    pub serial: ConsoleConfig,
    /// virtio-console (off).
    pub console: ConsoleConfig,
}

/// `CpusConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// Maximum vCPUs.
    pub max_vcpus: u32,
    /// Guest physical address width: sets the 64-bit MMIO window's size (from the top
    /// of RAM to the top of the address space). Cloud Hypervisor takes the smaller of
    /// this and the host's width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_phys_bits: Option<u8>,
}

/// `MemoryConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
    /// Shared mappings, required by vhost-user (virtio-fs).
    pub shared: bool,
    /// Back guest memory with hugetlbfs pages.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hugepages: bool,
    /// Hugepage size in bytes (the host's default when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    /// Touch every page at start (`MAP_POPULATE`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prefault: bool,
}

/// `PayloadConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PayloadConfig {
    /// Kernel path.
    pub kernel: String,
    /// Initramfs path.
    pub initramfs: String,
    /// Kernel command line.
    pub cmdline: String,
}

/// `FsConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsConfig {
    /// Mount tag.
    pub tag: String,
    /// virtiofsd socket.
    pub socket: String,
    /// Request queues.
    pub num_queues: u32,
    /// Queue size.
    pub queue_size: u32,
}

/// `NetConfig` (tap only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetConfig {
    /// Host tap device name.
    pub tap: String,
}

/// `DeviceConfig` (VFIO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceConfig {
    /// `/sys/bus/pci/devices/<bdf>/`.
    pub path: String,
    /// Device id in the VMM.
    pub id: String,
}

/// `VsockConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockConfig {
    /// Guest CID (≥ 3).
    pub cid: u32,
    /// Hybrid-vsock unix socket.
    pub socket: String,
}

/// `ConsoleConfig` / `SerialConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsoleConfig {
    /// `Off`, `File`, …
    pub mode: String,
    /// Log file when `mode` is `File`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

fn path_text(what: &str, path: &Path) -> Result<String> {
    if !path.is_absolute() {
        return Err(Error::VmConfig(format!(
            "{what} path {} must be absolute",
            path.display()
        )));
    }
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::VmConfig(format!("{what} path {} is not UTF-8", path.display())))
}

impl TryFrom<&VmSpec> for VmConfig {
    type Error = Error;

    fn try_from(spec: &VmSpec) -> Result<VmConfig> {
        if spec.size.cpus == 0 {
            return Err(Error::VmConfig("a VM needs at least one vCPU".into()));
        }
        let size = spec
            .size
            .memory_mib
            .checked_mul(1 << 20)
            .filter(|bytes| *bytes > 0)
            .ok_or_else(|| Error::VmConfig(format!("memory of {} MiB", spec.size.memory_mib)))?;
        let devices = spec
            .devices
            .iter()
            .enumerate()
            .map(|(i, bdf)| DeviceConfig {
                path: format!("/sys/bus/pci/devices/{bdf}/"),
                id: format!("gpu{i}"),
            })
            .collect();
        Ok(VmConfig {
            cpus: CpusConfig {
                boot_vcpus: spec.size.cpus,
                max_vcpus: spec.size.cpus,
                max_phys_bits: spec
                    .mmio64_size
                    .map(|window| crate::devices::guest_phys_bits(size, window)),
            },
            memory: MemoryConfig {
                size,
                shared: true,
                hugepages: spec.memory.hugepages,
                hugepage_size: spec.memory.hugepage_size.filter(|_| spec.memory.hugepages),
                prefault: spec.memory.prefault,
            },
            payload: PayloadConfig {
                kernel: path_text("kernel", &spec.kernel)?,
                initramfs: path_text("initramfs", &spec.initramfs)?,
                cmdline: spec.cmdline.clone(),
            },
            fs: match &spec.shared_dir {
                Some(_) => vec![FsConfig {
                    tag: SHARED_FS_TAG.to_owned(),
                    socket: path_text("virtio-fs socket", &spec.virtiofs_socket())?,
                    num_queues: 1,
                    queue_size: 1024,
                }],
                None => Vec::new(),
            },
            net: spec
                .taps
                .iter()
                .map(|tap| NetConfig { tap: tap.clone() })
                .collect(),
            devices,
            vsock: VsockConfig {
                cid: GUEST_CID,
                socket: path_text("vsock socket", &spec.vsock_socket())?,
            },
            serial: ConsoleConfig {
                mode: "File".into(),
                file: Some(path_text("console log", &spec.console_log())?),
            },
            console: ConsoleConfig {
                mode: "Off".into(),
                file: None,
            },
        })
    }
}

/// Client for the REST API on one unix socket. Cloud Hypervisor handles one request at
/// a time, so every call holds the one mutex.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl ApiClient {
    /// A client for the API socket at `socket` (nothing is opened yet).
    pub fn new(socket: PathBuf) -> ApiClient {
        ApiClient {
            socket,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// `PUT /api/v1/<endpoint>` with an optional JSON body; returns the response body.
    pub async fn put(&self, endpoint: &str, body: Option<&serde_json::Value>) -> Result<Bytes> {
        let body =
            match body {
                Some(value) => Bytes::from(serde_json::to_vec(value).map_err(|e| {
                    Error::Hypervisor(format!("cannot encode {endpoint} body: {e}"))
                })?),
                None => Bytes::new(),
            };
        self.request(hyper::Method::PUT, endpoint, body).await
    }

    /// `GET /api/v1/<endpoint>`.
    pub async fn get(&self, endpoint: &str) -> Result<Bytes> {
        self.request(hyper::Method::GET, endpoint, Bytes::new())
            .await
    }

    async fn request(&self, method: hyper::Method, endpoint: &str, body: Bytes) -> Result<Bytes> {
        let _guard = self.lock.lock().await;
        let hyper_error = |e: hyper::Error| Error::Hypervisor(format!("API {endpoint}: {e}"));
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(Error::io(format!(
                "cannot connect to {}",
                self.socket.display()
            )))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(hyper_error)?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
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
            .map_err(|e| Error::Hypervisor(format!("API {endpoint}: {e}")))?;
        let response = sender.send_request(request).await.map_err(hyper_error)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(hyper_error)?
            .to_bytes();
        driver.abort();
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

/// The production backend.
#[derive(Debug)]
pub struct CloudHypervisor {
    host: VmHost,
    binary: PathBuf,
    api: ApiClient,
}

impl CloudHypervisor {
    /// A backend for `spec`; nothing starts until [`super::Hypervisor::start`].
    pub fn new(config: &ShimConfig, spec: VmSpec) -> CloudHypervisor {
        let api = ApiClient::new(spec.work_dir.join("ch-api.sock"));
        CloudHypervisor {
            binary: config.binaries.cloud_hypervisor.clone(),
            api,
            host: VmHost::new(config, spec, "cloud-hypervisor"),
        }
    }

    /// The REST client (for `vm.info` and friends).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The VM's state as `vm.info` reports it (`Created`, `Running`, `Shutdown`, …).
    pub async fn vm_state(&self) -> Result<String> {
        let body = self.api.get("vm.info").await?;
        let info: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| Error::Hypervisor(format!("vm.info answered invalid JSON: {e}")))?;
        info.get("state")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Hypervisor("vm.info has no state".into()))
    }
}

#[async_trait]
impl Vmm for CloudHypervisor {
    fn host(&self) -> &VmHost {
        &self.host
    }

    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()> {
        let config = serde_json::to_value(VmConfig::try_from(self.host.spec())?)
            .map_err(|e| Error::VmConfig(e.to_string()))?;
        self.host.create_work_dir()?;
        self.host.start_virtiofsd(spawned).await?;

        let api_socket = self.host.spec().work_dir.join("ch-api.sock");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-socket")
            .arg(format!("path={}", api_socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(self.host.log_file("cloud-hypervisor.log")?)
            .stderr(self.host.log_file("cloud-hypervisor.log")?);
        let vmm = self.host.spawn_vmm(&self.binary, cmd, spawned)?;
        self.host.wait_for_socket(&api_socket, &vmm).await?;

        self.api.put("vm.create", Some(&config)).await?;
        self.api.put("vm.boot", None).await?;
        tracing::info!(id = %self.host.spec().id, pid = vmm.pid(), "VM booted (cloud-hypervisor)");
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        let Some(vmm) = self.host.vmm() else {
            return Ok(());
        };
        if vmm.exited().is_none() {
            // The VM may already be off (guest powered off): carry on to vmm.shutdown.
            for endpoint in ["vm.shutdown", "vm.delete"] {
                if let Err(e) = self.api.put(endpoint, None).await {
                    tracing::debug!(endpoint, error = %e, "API call failed");
                }
            }
            if let Err(e) = self.api.put("vmm.shutdown", None).await {
                tracing::debug!(error = %e, "vmm.shutdown failed");
            }
        }
        if tokio::time::timeout(self.host.shutdown_timeout(), vmm.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = vmm.pid(),
                "cloud-hypervisor did not exit after vmm.shutdown"
            );
            vmm.stop(Duration::from_secs(1)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::sample_spec;

    #[test]
    fn vm_config_from_spec() {
        let config = VmConfig::try_from(&sample_spec()).expect("valid");
        let json = serde_json::to_value(&config).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 1073741824u64, "shared": true},
                "payload": {
                    "kernel": "/usr/share/gpuvm/vmlinux",
                    "initramfs": "/usr/share/gpuvm/initramfs.img",
                    "cmdline": "console=ttyS0 reboot=k panic=1"
                },
                "fs": [{"tag": "gpuvm", "socket": "/run/gpuvm/sandbox1/virtiofs.sock",
                        "num_queues": 1, "queue_size": 1024}],
                "net": [{"tap": "tap0"}],
                "devices": [{"path": "/sys/bus/pci/devices/0000:3b:00.0/", "id": "gpu0"}],
                "vsock": {"cid": 3, "socket": "/run/gpuvm/sandbox1/vsock.sock"},
                "serial": {"mode": "File", "file": "/run/gpuvm/sandbox1/console.log"},
                "console": {"mode": "Off"}
            })
        );
    }

    #[test]
    fn large_bars_prefault_and_hugepages_reach_the_config() {
        let mut spec = sample_spec();
        spec.mmio64_size = Some(4 << 40);
        spec.memory = crate::hypervisor::MemoryOptions {
            prefault: true,
            hugepages: true,
            hugepage_size: Some(1 << 30),
        };
        let json = serde_json::to_value(VmConfig::try_from(&spec).expect("valid")).expect("json");
        assert_eq!(
            json["cpus"],
            serde_json::json!({"boot_vcpus": 2, "max_vcpus": 2, "max_phys_bits": 46})
        );
        assert_eq!(
            json["memory"],
            serde_json::json!({"size": 1073741824u64, "shared": true, "hugepages": true,
                               "hugepage_size": 1073741824u64, "prefault": true})
        );
    }

    #[test]
    fn bad_specs_give_typed_errors() {
        let mut no_cpu = sample_spec();
        no_cpu.size.cpus = 0;
        let mut no_mem = sample_spec();
        no_mem.size.memory_mib = 0;
        let mut relative = sample_spec();
        relative.kernel = PathBuf::from("vmlinux");
        for spec in [no_cpu, no_mem, relative] {
            let err = VmConfig::try_from(&spec).expect_err("must fail");
            assert!(matches!(err, Error::VmConfig(_)), "{err}");
        }
    }

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
        let reply = api.get("vm.info").await.expect("info");
        assert_eq!(&reply[..], info.as_bytes());
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

    #[test]
    fn empty_lists_are_left_out() {
        let mut spec = sample_spec();
        spec.devices.clear();
        spec.taps.clear();
        spec.shared_dir = None;
        let json = serde_json::to_value(VmConfig::try_from(&spec).expect("valid")).expect("json");
        assert!(json.get("devices").is_none());
        assert!(json.get("net").is_none());
        assert!(json.get("fs").is_none());
    }
}
