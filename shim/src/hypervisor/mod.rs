//! The `Hypervisor` seam: a small trait with two real implementations,
//! [`CloudHypervisor`] (production) and [`Qemu`] (machines without a KVM that boots
//! real guests). Both expose the guest's vsock as a hybrid-vsock unix socket, so the
//! shim → agent path is the same code on both.
//!
//! A backend implements [`Vmm`] (start and shutdown, the parts that differ); what every
//! VM has on the host (work dir, logs, virtiofsd, its processes) is [`VmHost`], once.

pub mod ch_api;
pub mod cloud_hypervisor;
mod host;
pub mod qemu;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use cloud_hypervisor::CloudHypervisor;
pub use host::VmHost;
pub use qemu::Qemu;

use crate::config::{Backend, GuestSize, ShimConfig};
use crate::error::Result;

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARED_FS_TAG: &str = "gpuvm";
/// Guest vsock CID (any value ≥ 3; each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;
/// The guest's serial console log, in the VM's work dir.
pub const CONSOLE_LOG: &str = "console.log";

/// Everything a backend needs to start one VM. Built from the config and the pod's
/// annotations; holds no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Sandbox id (used in names).
    pub id: String,
    /// Private directory for this VM's sockets and logs (short: unix socket paths are
    /// limited to 108 bytes).
    pub work_dir: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs and memory.
    pub size: GuestSize,
    /// Host directory shared with the guest over virtio-fs (tag [`SHARED_FS_TAG`]);
    /// `None` starts no virtiofsd.
    pub shared_dir: Option<PathBuf>,
    /// PCI addresses of the VFIO devices passed to the guest.
    pub devices: Vec<String>,
    /// virtio-net devices, each on a tap in `netns`.
    pub nics: Vec<Nic>,
    /// The pod's network namespace: the VMM is started inside it (its taps are
    /// there); `None` keeps the shim's.
    pub netns: Option<PathBuf>,
    /// Size of the guest's 64-bit PCI MMIO window in bytes, from the passed devices'
    /// BARs ([`crate::devices::mmio64_window`]); `None` keeps the VMM's default.
    pub mmio64_size: Option<u64>,
    /// How guest memory is backed.
    pub memory: MemoryOptions,
    /// The pod's cgroup, one directory per hierarchy: every process started for the
    /// VM joins them before exec. Empty: they stay in the shim's.
    pub cgroups: Vec<PathBuf>,
    /// The host NUMA node (and its CPUs) every process of the VM is bound to: its
    /// GPUs' node on a multi-node host, else `None`.
    pub numa: Option<crate::numa::NumaPlacement>,
}

/// A virtio-net device of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap it is backed by (in the VM's network namespace).
    pub tap: String,
    /// The guest NIC's MAC (`aa:bb:cc:dd:ee:ff`): the pod interface's.
    pub mac: String,
}

/// Guest memory backing, from the config's `[memory]` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Touch every page at start.
    pub prefault: bool,
    /// Back memory with hugetlbfs pages.
    pub hugepages: bool,
    /// Hugepage size in bytes; `None` is the host's default size.
    pub hugepage_size: Option<u64>,
}

impl VmSpec {
    /// Hybrid-vsock unix socket (the shim connects here).
    pub fn vsock_socket(&self) -> PathBuf {
        self.work_dir.join("vsock.sock")
    }
    /// virtiofsd's vhost-user socket.
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.work_dir.join("virtiofs.sock")
    }
    /// Guest serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.work_dir.join(CONSOLE_LOG)
    }
}

/// The kernel command line common to both backends.
pub fn kernel_cmdline(extra: &str) -> String {
    let base = "console=ttyS0 reboot=k panic=1";
    if extra.trim().is_empty() {
        base.to_owned()
    } else {
        format!("{base} {}", extra.trim())
    }
}

/// A helper process as recorded in the state file, so `shim delete` can kill it after
/// a shim crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedProcess {
    /// Role, e.g. `cloud-hypervisor`, `virtiofsd`.
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// The binary it runs (checked against `/proc/<pid>/exe` before killing).
    pub binary: PathBuf,
}

/// One VM's footprint on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Processes started for the VM.
    pub processes: Vec<RecordedProcess>,
    /// The VM's private directory (sockets, logs), removed on cleanup.
    pub work_dir: PathBuf,
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmExit {
    /// The VMM process's exit code (128 + signal when killed).
    pub vmm_exit_code: i32,
}

/// Called with the VM's record after each of its processes starts.
pub type SpawnHook<'a> = dyn Fn(&VmRecord) + Send + Sync + 'a;

/// A running (or starting) VM. Kept small on purpose.
#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Starts the VMM and its helpers, creates and boots the VM. Returns once the VM
    /// runs; the agent may still be booting. `spawned` is called with the record so
    /// far after each process starts, so that a shim killed mid-start leaves a state
    /// file naming everything `shim delete` must kill.
    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()>;
    /// The VMM's pid (reported to containerd as the sandbox task's pid).
    fn pid(&self) -> Option<u32>;
    /// The hybrid-vsock unix socket to reach the guest.
    fn vsock_socket(&self) -> PathBuf;
    /// Resolves when the VMM process has exited (guest power-off, crash, shutdown).
    async fn wait_exit(&self) -> VmExit;
    /// Stops the VM and waits for the VMM to exit, killing it after the timeout.
    async fn shutdown(&self) -> Result<()>;
    /// Kills whatever is left (helpers included) and removes sockets and the work dir.
    /// Idempotent.
    async fn cleanup(&self);
    /// What to write in the state file.
    fn record(&self) -> VmRecord;
}

/// What one VMM does its own way. The rest of [`Hypervisor`] (pid, vsock socket,
/// waiting, cleanup, record) is the same for every VMM and comes from its [`VmHost`],
/// so every `Vmm` is a `Hypervisor`.
#[async_trait]
pub trait Vmm: Send + Sync + std::fmt::Debug {
    /// The VM's host side: spec, work dir, process list.
    fn host(&self) -> &VmHost;
    /// [`Hypervisor::start`]: the helpers this VMM needs, the VMM, the VM's boot.
    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()>;
    /// [`Hypervisor::shutdown`]: asks the VM to stop and waits for the VMM to exit.
    async fn shutdown(&self) -> Result<()>;
}

#[async_trait]
impl<T: Vmm> Hypervisor for T {
    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()> {
        Vmm::start(self, spawned).await
    }

    fn pid(&self) -> Option<u32> {
        self.host().vmm().map(|p| p.pid())
    }

    fn vsock_socket(&self) -> PathBuf {
        self.host().spec().vsock_socket()
    }

    async fn wait_exit(&self) -> VmExit {
        self.host().wait_exit().await
    }

    async fn shutdown(&self) -> Result<()> {
        Vmm::shutdown(self).await
    }

    async fn cleanup(&self) {
        self.host().stop_all().await;
    }

    fn record(&self) -> VmRecord {
        self.host().record()
    }
}

/// Whether KVM here can boot a stock Linux guest: `/dev/kvm` must exist and the CPU
/// must advertise hardware virtualization (`vmx`/`svm`). Nested PVM exposes `/dev/kvm`
/// without those flags and cannot boot stock kernels.
pub fn kvm_runs_real_guests(cpuinfo: &str, dev_kvm_exists: bool) -> bool {
    dev_kvm_exists
        && cpuinfo.lines().any(|line| {
            line.starts_with("flags")
                && line
                    .split_whitespace()
                    .any(|flag| flag == "vmx" || flag == "svm")
        })
}

/// Probes this host for [`kvm_runs_real_guests`].
pub fn probe_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    kvm_runs_real_guests(&cpuinfo, Path::new("/dev/kvm").exists())
}

/// The backend that `auto` resolves to (pure).
pub fn resolve_backend(
    configured: Backend,
    kvm_ok: bool,
    cloud_hypervisor_present: bool,
) -> Backend {
    match configured {
        Backend::Auto if kvm_ok && cloud_hypervisor_present => Backend::CloudHypervisor,
        Backend::Auto => Backend::Qemu,
        explicit => explicit,
    }
}

/// Builds the configured backend for `spec` (no I/O beyond probing KVM).
pub fn new_hypervisor(config: &ShimConfig, spec: VmSpec) -> Box<dyn Hypervisor> {
    let kvm = probe_kvm();
    let backend = resolve_backend(
        config.backend,
        kvm,
        config.binaries.cloud_hypervisor.exists(),
    );
    tracing::debug!(?backend, kvm, "hypervisor backend chosen");
    match backend {
        Backend::CloudHypervisor => Box::new(CloudHypervisor::new(config, spec)),
        Backend::Qemu | Backend::Auto => Box::new(Qemu::new(config, spec, kvm)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The VM spec the backends' tests translate.
    pub(crate) fn sample_spec() -> VmSpec {
        VmSpec {
            id: "sandbox1".into(),
            work_dir: PathBuf::from("/run/gpuvm/sandbox1"),
            kernel: PathBuf::from("/usr/share/gpuvm/vmlinux"),
            initramfs: PathBuf::from("/usr/share/gpuvm/initramfs.img"),
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            size: GuestSize {
                cpus: 2,
                memory_mib: 1024,
            },
            shared_dir: Some(PathBuf::from("/run/gpuvm/sandbox1/shared")),
            devices: vec!["0000:3b:00.0".into()],
            nics: vec![Nic {
                tap: "tap0".into(),
                mac: "02:42:0a:58:00:05".into(),
            }],
            netns: None,
            mmio64_size: None,
            memory: Default::default(),
            cgroups: vec![],
            numa: None,
        }
    }

    #[test]
    fn kvm_probe_needs_hardware_virtualization_flags() {
        let vmx = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
        let pvm = "processor\t: 0\nflags\t\t: fpu vme sse hypervisor\n";
        assert!(kvm_runs_real_guests(vmx, true));
        assert!(!kvm_runs_real_guests(vmx, false));
        assert!(!kvm_runs_real_guests(pvm, true));
        assert!(kvm_runs_real_guests("flags : svm\n", true));
    }

    #[test]
    fn auto_prefers_cloud_hypervisor_only_where_it_can_run() {
        use Backend::*;
        let cases = [
            (Auto, true, true, CloudHypervisor),
            (Auto, false, true, Qemu),
            (Auto, true, false, Qemu),
            (Qemu, true, true, Qemu),
            (CloudHypervisor, false, false, CloudHypervisor),
        ];
        for (configured, kvm, ch, want) in cases {
            assert_eq!(
                resolve_backend(configured, kvm, ch),
                want,
                "{configured:?} {kvm} {ch}"
            );
        }
    }

    #[test]
    fn cmdline_appends_extra_params() {
        assert_eq!(kernel_cmdline(""), "console=ttyS0 reboot=k panic=1");
        assert_eq!(
            kernel_cmdline(" quiet "),
            "console=ttyS0 reboot=k panic=1 quiet"
        );
    }
}
