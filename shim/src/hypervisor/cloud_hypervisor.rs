//! Cloud Hypervisor backend: `cloud-hypervisor --api-socket <path>` driven over its
//! REST API (HTTP/1.1 on a unix socket, [`super::ch_api`]), with its event monitor read
//! so that a guest that resets or panics ends the VM.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::process::Command;

pub use super::ch_api::{ApiClient, GuestEnd};
use super::ch_api::{EventReader, create_timeout, open_event_fifo};
use super::{CONSOLE_LOG, GUEST_CID, SHARED_FS_TAG, SpawnHook, VmHost, VmSpec, Vmm};
use crate::config::ShimConfig;
use crate::error::{Error, Result};
use crate::process::WatchedProcess;

/// Every REST call the backend makes: (endpoint, HTTP method, has a JSON body). The
/// contract test checks each against Cloud Hypervisor's OpenAPI spec.
pub const API_CALLS: &[(&str, &str, bool)] = &[
    ("vmm.ping", "get", false),
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
    /// A pvpanic device, so that a guest's panic report reaches the event monitor.
    pub pvpanic: bool,
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
    /// Tap device name (Cloud Hypervisor runs in the pod's network namespace and opens
    /// the shim's tap by name: `vm.create` ignores fds in the body).
    pub tap: String,
    /// The guest NIC's MAC.
    pub mac: String,
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
                .nics
                .iter()
                .map(|nic| NetConfig {
                    tap: nic.tap.clone(),
                    mac: nic.mac.clone(),
                })
                .collect(),
            devices,
            vsock: VsockConfig {
                cid: GUEST_CID,
                socket: path_text("vsock socket", &spec.vsock_socket())?,
            },
            // The serial port writes to the VMM's stdout, which the shim opened on the
            // console log in append mode: a reset re-creates the VM's devices, and a
            // `File` serial would be created anew (truncated), losing the output that
            // led to the reset (a panic message, say).
            serial: ConsoleConfig {
                mode: "Tty".into(),
                file: None,
            },
            console: ConsoleConfig {
                mode: "Off".into(),
                file: None,
            },
            pvpanic: true,
        })
    }
}

/// How long the VMM may take to answer `vmm.ping` after it starts.
const API_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `vm.boot` may take (kernel loading, vCPU start; the memory is set up by
/// `vm.create`).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The production backend.
#[derive(Debug)]
pub struct CloudHypervisor {
    host: VmHost,
    binary: PathBuf,
    api: Arc<ApiClient>,
    /// Set when the guest reset or panicked and the shim ended the VM for it.
    guest_end: Arc<Mutex<Option<GuestEnd>>>,
    /// Reads the event monitor while the VMM runs (it ends with the VMM); aborted on
    /// drop.
    event_watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl CloudHypervisor {
    /// A backend for `spec`; nothing starts until [`super::Hypervisor::start`].
    pub fn new(config: &ShimConfig, spec: VmSpec) -> CloudHypervisor {
        let api = ApiClient::new(spec.work_dir.join("ch-api.sock"));
        CloudHypervisor {
            binary: config.binaries.cloud_hypervisor.clone(),
            api: Arc::new(api),
            host: VmHost::new(config, spec, "cloud-hypervisor"),
            guest_end: Arc::new(Mutex::new(None)),
            event_watcher: Mutex::new(None),
        }
    }

    /// The REST client (for `vm.info` and friends).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// The VM's state as `vm.info` reports it (`Created`, `Running`, `Shutdown`, …).
    pub async fn vm_state(&self) -> Result<String> {
        let info = self.api.get_json("vm.info").await?;
        info.get("state")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Hypervisor("vm.info has no state".into()))
    }

    /// Whether the VM ended because its guest reset or panicked (rather than powered
    /// off or was shut down).
    pub fn guest_end(&self) -> Option<GuestEnd> {
        *lock(&self.guest_end)
    }

    /// The Cloud Hypervisor event FIFO in the VM's work dir.
    pub fn event_fifo(&self) -> PathBuf {
        self.host.spec().work_dir.join("ch-events.fifo")
    }

    /// Waits until the API answers `vmm.ping`: the socket file appears at `bind`, a
    /// moment before the server accepts. A VMM that exits first is an error that points
    /// at its log (no KVM, a bad option, …).
    async fn wait_for_api(&self, vmm: &WatchedProcess) -> Result<()> {
        let deadline = tokio::time::Instant::now() + API_READY_TIMEOUT;
        let mut waited = self.host.wait_for_socket(self.api.socket(), vmm).await;
        while waited.is_ok() {
            let ping = self.api.get_json("vmm.ping").await.and_then(|reply| {
                reply.get("version").map(|_| ()).ok_or_else(|| {
                    Error::Hypervisor(format!("vmm.ping answered without a version: {reply}"))
                })
            });
            match ping {
                Ok(()) => return Ok(()),
                Err(e) if vmm.exited().is_some() || tokio::time::Instant::now() >= deadline => {
                    waited = Err(e);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let log = self.host.spec().work_dir.join("cloud-hypervisor.log");
        // Give an exit that is under way the moment it needs to be seen as one.
        let exited = match vmm.exited() {
            Some(exit) => Some(exit),
            None => tokio::time::timeout(Duration::from_millis(200), vmm.wait())
                .await
                .ok(),
        };
        match (exited, waited) {
            (Some(exit), _) => Err(Error::Hypervisor(format!(
                "cloud-hypervisor exited with code {} before its API answered (see {})",
                exit.code,
                log.display()
            ))),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    }
}

impl Drop for CloudHypervisor {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.event_watcher).take() {
            task.abort();
        }
    }
}

/// Locks `mutex`, recovering from a poisoned lock (the data is a plain value).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the event monitor until the VMM exits. When the guest resets (Cloud
/// Hypervisor would reboot it) or reports a panic, records why and ends the VMM, so
/// that a crashed guest is the VM's exit, as QEMU's `-no-reboot` makes it.
async fn watch_events<R: tokio::io::AsyncRead + Unpin>(
    mut events: EventReader<R>,
    api: Arc<ApiClient>,
    vmm: WatchedProcess,
    guest_end: Arc<Mutex<Option<GuestEnd>>>,
    grace: Duration,
) {
    let end = loop {
        tokio::select! {
            _ = vmm.wait() => return,
            event = events.next() => match event {
                Ok(Some(event)) => {
                    tracing::debug!(source = %event.source, event = %event.event, "VMM event");
                    if let Some(end) = event.guest_end() {
                        break end;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "stopped reading the VMM's events: a guest reset will reboot the VM");
                    return;
                }
            },
        }
    };
    *lock(&guest_end) = Some(end);
    tracing::warn!(
        ?end,
        pid = vmm.pid(),
        "the guest reset or panicked: ending its VM"
    );
    if let Err(e) = api.put_within("vmm.shutdown", None, grace).await {
        tracing::debug!(error = %e, "vmm.shutdown failed");
    }
    if tokio::time::timeout(grace, vmm.wait()).await.is_err() {
        vmm.stop(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl Vmm for CloudHypervisor {
    fn host(&self) -> &VmHost {
        &self.host
    }

    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()> {
        let spec = self.host.spec();
        let config = serde_json::to_value(VmConfig::try_from(spec)?)
            .map_err(|e| Error::VmConfig(e.to_string()))?;
        self.host.create_work_dir()?;
        self.host.start_virtiofsd(spawned).await?;

        // The reader opens the FIFO first, so that the VMM's open never blocks.
        let events = open_event_fifo(&self.event_fifo())?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-socket")
            .arg(format!("path={}", self.api.socket().display()))
            .arg("--event-monitor")
            .arg(format!("path={}", self.event_fifo().display()))
            .stdin(std::process::Stdio::null())
            .stdout(self.host.log_file(CONSOLE_LOG)?)
            .stderr(self.host.log_file("cloud-hypervisor.log")?);
        let vmm = self.host.spawn_vmm(&self.binary, cmd, spawned)?;
        *lock(&self.event_watcher) = Some(tokio::spawn(watch_events(
            events,
            Arc::clone(&self.api),
            vmm.clone(),
            Arc::clone(&self.guest_end),
            self.host.shutdown_timeout(),
        )));
        self.wait_for_api(&vmm).await?;

        let touches_all_memory = spec.memory.prefault || !spec.devices.is_empty();
        let create_within = create_timeout(spec.size.memory_mib, touches_all_memory);
        self.api
            .put_within("vm.create", Some(&config), create_within)
            .await?;
        self.api.put_within("vm.boot", None, BOOT_TIMEOUT).await?;
        tracing::info!(id = %spec.id, pid = vmm.pid(), "VM booted (cloud-hypervisor)");
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        let Some(vmm) = self.host.vmm() else {
            return Ok(());
        };
        let grace = self.host.shutdown_timeout();
        if vmm.exited().is_none() {
            // The VM may already be off (guest powered off): carry on to vmm.shutdown.
            // Each call gets the shutdown timeout, so a wedged VMM is killed below.
            for endpoint in ["vm.shutdown", "vm.delete", "vmm.shutdown"] {
                if let Err(e) = self.api.put_within(endpoint, None, grace).await {
                    tracing::debug!(endpoint, error = %e, "API call failed");
                }
            }
        }
        if tokio::time::timeout(grace, vmm.wait()).await.is_err() {
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
                "net": [{"tap": "tap0", "mac": "02:42:0a:58:00:05"}],
                "devices": [{"path": "/sys/bus/pci/devices/0000:3b:00.0/", "id": "gpu0"}],
                "vsock": {"cid": 3, "socket": "/run/gpuvm/sandbox1/vsock.sock"},
                "serial": {"mode": "Tty"},
                "console": {"mode": "Off"},
                "pvpanic": true
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

    #[test]
    fn empty_lists_are_left_out() {
        let mut spec = sample_spec();
        spec.devices.clear();
        spec.nics.clear();
        spec.shared_dir = None;
        let json = serde_json::to_value(VmConfig::try_from(&spec).expect("valid")).expect("json");
        assert!(json.get("devices").is_none());
        assert!(json.get("net").is_none());
        assert!(json.get("fs").is_none());
    }
}
