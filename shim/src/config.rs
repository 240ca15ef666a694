//! Runtime configuration: the TOML file, its defaults, and the per-pod overrides read
//! from annotations. Everything here is a pure function of its inputs, except
//! [`ShimConfig::load`] which reads the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gpuvm_api::quantity;
use gpuvm_pci::PciAddress;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The Pod annotations the operator writes for the shim, from their owner
/// (`gpuvm_api::keys`): the guest's vCPUs and memory, the devices, and the GPU models.
pub use gpuvm_api::keys::{
    ANNOTATION_CPUS, ANNOTATION_DEVICES, ANNOTATION_GPU_MODELS, ANNOTATION_MEMORY,
};

/// Where the config file is when nothing else says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/gpuvm/shim.toml";
/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "GPUVM_SHIM_CONFIG";

/// CRI sandbox annotation: the Pod's namespace.
pub const ANNOTATION_POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// CRI sandbox annotation: the Pod's name.
pub const ANNOTATION_POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// CRI sandbox annotation: the Pod's UID.
pub const ANNOTATION_POD_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// CRI sandbox annotations with the Pod's resources. containerd's CRI plugin (1.6 and
/// later, 2.x included) writes all four onto the sandbox's OCI spec from the kubelet's
/// `PodSandboxConfig.linux.resources`, which the kubelet (1.23 and later) computes from
/// the Pod's containers without the RuntimeClass overhead: the CFS period and quota
/// from the CPU limits (quota 0: no limit), the shares from the CPU requests
/// (`millicores × 1024 / 1000`, at least 2), the memory limit in bytes (0: no limit).
pub const ANNOTATION_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// See [`ANNOTATION_SANDBOX_CPU_PERIOD`].
pub const ANNOTATION_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`ANNOTATION_SANDBOX_CPU_PERIOD`].
pub const ANNOTATION_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
/// See [`ANNOTATION_SANDBOX_CPU_PERIOD`].
pub const ANNOTATION_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Where the GPU flavour of the guest initramfs is when the config does not say.
pub const DEFAULT_GPU_INITRAMFS: &str = "/usr/share/gpuvm/initramfs-gpu.img";
/// Seconds between GPU check rounds when the config does not say.
pub const DEFAULT_GPU_CHECK_INTERVAL_SECS: u64 = 60;
/// The shortest period a GPU check may run at (each round runs NVML in the guest).
pub const MIN_GPU_CHECK_INTERVAL_SECS: u64 = 5;
/// The longest period a GPU check may run at (a day; for "never" there is 0).
pub const MAX_GPU_CHECK_INTERVAL_SECS: u64 = 86_400;

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Cloud Hypervisor through its REST API (production, needs a KVM that boots real guests).
    CloudHypervisor,
    /// QEMU, with KVM when it works and TCG otherwise.
    Qemu,
    /// Cloud Hypervisor where KVM runs real guests, else QEMU.
    Auto,
}

/// The whole config file. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// `cloud-hypervisor`, `qemu` or `auto` (default `auto`).
    pub backend: Backend,
    /// Log level for the shim (`error`, `warn`, `info`, `debug`, `trace`; default `info`).
    pub log_level: String,
    /// Guest image and size.
    pub guest: GuestConfig,
    /// Paths of the helper binaries.
    pub binaries: BinaryPaths,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Guest memory backing (prefault, hugepages).
    pub memory: MemoryBacking,
    /// Host paths the device checks, locks, resets and reports use.
    pub host: HostPaths,
}

/// How guest memory is backed. With VFIO devices every guest page is pinned anyway;
/// prefaulting moves that cost to boot instead of the first DMA.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryBacking {
    /// Touch all guest memory at VM start (CH `memory.prefault`, QEMU `prealloc=on`).
    pub prefault: bool,
    /// Back guest memory with hugetlbfs pages (CH `memory.hugepages`, QEMU `hugetlb=on`).
    pub hugepages: bool,
    /// Hugepage size as a quantity (`2Mi`, `1Gi`); empty means the host's default size.
    pub hugepage_size: String,
}

/// Host paths, parameters so tests can point them at fake trees.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostPaths {
    /// sysfs root (`/sys`).
    pub sysfs_root: PathBuf,
    /// dev root holding `vfio/<group>` (`/dev`).
    pub dev_root: PathBuf,
    /// Per-device lock files (`/run/gpuvm/devices`).
    pub lock_dir: PathBuf,
    /// Reset-failure records read by the node agent (`/run/gpuvm/health`).
    pub health_dir: PathBuf,
    /// In-guest GPU check results read by the node agent (`/run/gpuvm/gpu-check`).
    pub gpu_check_dir: PathBuf,
    /// Size of each VM's share, a tmpfs of its own (a quantity; default `16Mi`). It
    /// holds only the directories the rootfs mounts sit on: the guest cannot write it.
    pub share_size: String,
}

impl HostPaths {
    /// [`HostPaths::share_size`] in bytes.
    pub fn share_size_bytes(&self) -> Result<u64> {
        match quantity::parse_bytes(&self.share_size) {
            Ok(bytes) if bytes >= 1 << 20 => Ok(bytes),
            Ok(_) => Err(Error::Config(format!(
                "host.share_size ({}) must be at least 1Mi",
                self.share_size
            ))),
            Err(e) => Err(Error::Config(format!("host.share_size: {e}"))),
        }
    }
}

/// Guest image, kernel command line and size limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    /// Uncompressed guest kernel (`vmlinux`, PVH entry) or `bzImage`.
    pub kernel: PathBuf,
    /// Initramfs holding the agent: the small image, booted by a pod without GPUs
    /// (with `gpuvm.nvidia=off` on the kernel command line).
    pub initramfs: PathBuf,
    /// The GPU flavour of the initramfs (`guest/build.sh --gpu`: the NVIDIA open
    /// modules, the driver's libraries and the GPU check helper), booted by a pod with
    /// VFIO devices, with `gpuvm.nvidia=load`. A GPU pod whose image is missing fails
    /// to start, naming this key: a GPU VM without a driver is of no use.
    pub gpu_initramfs: PathBuf,
    /// The kernel a GPU pod boots; `None` (the default): [`GuestConfig::kernel`],
    /// which is the kernel the GPU image's modules are built for.
    pub gpu_kernel: Option<PathBuf>,
    /// Seconds between two rounds of the in-guest GPU check after the one at boot
    /// (`0`: at boot only). Each round asks the agent's `GpuInfo` and rewrites the
    /// record when the outcome changed (see `gpu_check`).
    pub gpu_check_interval: u64,
    /// Extra kernel command line.
    pub kernel_params: String,
    /// vCPUs when the pod has no `gpuvm.dev/cpus` annotation.
    pub default_cpus: u32,
    /// Memory when the pod has no `gpuvm.dev/memory` annotation (a quantity).
    pub default_memory: String,
    /// Largest vCPU count an annotation may ask for.
    pub max_cpus: u32,
    /// Largest memory an annotation may ask for (a quantity).
    pub max_memory: String,
    /// Whether `gpuvm.dev/cpus` / `gpuvm.dev/memory` are honoured for a sandbox that
    /// containerd passed no Pod resources for (not a Kubernetes Pod: `ctr run`, or a
    /// memory annotation on a Pod without a memory limit). Off by default: a VM is
    /// never larger than what the scheduler accounted for.
    pub allow_size_without_pod_resources: bool,
    /// vsock port the agent listens on.
    pub agent_port: u32,
}

impl GuestConfig {
    /// The kernel a pod with GPUs boots, with the config key that names it
    /// (`guest.gpu_kernel`, or `guest.kernel` when that is not set).
    pub fn gpu_kernel(&self) -> (&'static str, &Path) {
        match &self.gpu_kernel {
            Some(kernel) => ("guest.gpu_kernel", kernel),
            None => ("guest.kernel", &self.kernel),
        }
    }

    /// The period of the GPU check after its round at boot; `None`: boot only.
    pub fn gpu_check_period(&self) -> Option<std::time::Duration> {
        (self.gpu_check_interval > 0)
            .then(|| std::time::Duration::from_secs(self.gpu_check_interval))
    }

    /// `gpu_initramfs` and `gpu_kernel` are absolute paths, the period 0 or sane.
    fn validate_gpu_keys(&self) -> Result<()> {
        let paths = [
            ("guest.gpu_initramfs", Some(&self.gpu_initramfs)),
            ("guest.gpu_kernel", self.gpu_kernel.as_ref()),
        ];
        for (key, path) in paths {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(Error::Config(format!(
                    "{key} ({:?}) must be an absolute path",
                    path.display().to_string()
                )));
            }
        }
        let secs = self.gpu_check_interval;
        if secs != 0 && !(MIN_GPU_CHECK_INTERVAL_SECS..=MAX_GPU_CHECK_INTERVAL_SECS).contains(&secs)
        {
            return Err(Error::Config(format!(
                "guest.gpu_check_interval ({secs}) must be 0 (check at boot only) or between \
                 {MIN_GPU_CHECK_INTERVAL_SECS} and {MAX_GPU_CHECK_INTERVAL_SECS} seconds"
            )));
        }
        Ok(())
    }
}

/// Paths of the binaries the shim starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BinaryPaths {
    /// `cloud-hypervisor`.
    pub cloud_hypervisor: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
    /// `vhost-device-vsock` (QEMU backend only).
    pub vhost_device_vsock: PathBuf,
}

/// Timeouts, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// From VMM start until the agent answers on vsock.
    pub agent_connect_secs: u64,
    /// From `vm.shutdown` until the VMM process must have exited (then it is killed).
    pub vm_shutdown_secs: u64,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            backend: Backend::Auto,
            log_level: "info".to_owned(),
            guest: GuestConfig::default(),
            binaries: BinaryPaths::default(),
            timeouts: Timeouts::default(),
            memory: MemoryBacking::default(),
            host: HostPaths::default(),
        }
    }
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths {
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            lock_dir: PathBuf::from(gpuvm_pci::DEFAULT_LOCK_DIR),
            health_dir: PathBuf::from(gpuvm_pci::DEFAULT_HEALTH_DIR),
            gpu_check_dir: PathBuf::from(gpuvm_api::gpu_check::DEFAULT_GPU_CHECK_DIR),
            share_size: "16Mi".to_owned(),
        }
    }
}

impl MemoryBacking {
    /// The hugepage size in bytes, when one is configured.
    pub fn hugepage_size_bytes(&self) -> Result<Option<u64>> {
        if self.hugepage_size.trim().is_empty() {
            return Ok(None);
        }
        let bytes = quantity::parse_bytes(&self.hugepage_size)
            .map_err(|e| Error::Config(format!("memory.hugepage_size: {e}")))?;
        if !bytes.is_power_of_two() || bytes < 1 << 20 {
            return Err(Error::Config(format!(
                "memory.hugepage_size ({}) must be a power of two of at least 1Mi, like 2Mi or 1Gi",
                self.hugepage_size
            )));
        }
        Ok(Some(bytes))
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: PathBuf::from("/usr/share/gpuvm/vmlinux"),
            initramfs: PathBuf::from("/usr/share/gpuvm/initramfs.img"),
            gpu_initramfs: PathBuf::from(DEFAULT_GPU_INITRAMFS),
            gpu_kernel: None,
            gpu_check_interval: DEFAULT_GPU_CHECK_INTERVAL_SECS,
            kernel_params: String::new(),
            default_cpus: 1,
            default_memory: "1Gi".to_owned(),
            max_cpus: 64,
            max_memory: "256Gi".to_owned(),
            allow_size_without_pod_resources: false,
            agent_port: 1024,
        }
    }
}

impl Default for BinaryPaths {
    fn default() -> Self {
        BinaryPaths {
            cloud_hypervisor: PathBuf::from("/usr/bin/cloud-hypervisor"),
            qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            virtiofsd: PathBuf::from("/usr/libexec/virtiofsd"),
            vhost_device_vsock: PathBuf::from("/usr/local/bin/vhost-device-vsock"),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            agent_connect_secs: 60,
            vm_shutdown_secs: 10,
        }
    }
}

impl ShimConfig {
    /// Parses a config file's text and checks that its values are consistent.
    pub fn parse(text: &str, path: &Path) -> Result<ShimConfig> {
        let config: ShimConfig = toml::from_str(text).map_err(|source| Error::ConfigParse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the config file; a missing file at the *default* path gives the defaults,
    /// a missing file that was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<ShimConfig> {
        match std::fs::read_to_string(path) {
            Ok(text) => ShimConfig::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(ShimConfig::default())
            }
            Err(source) => Err(Error::ConfigRead {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self) -> Result<()> {
        let g = &self.guest;
        if g.default_cpus == 0 || g.max_cpus == 0 {
            return Err(Error::Config("guest CPU counts must be at least 1".into()));
        }
        if g.default_cpus > g.max_cpus {
            return Err(Error::Config(format!(
                "guest.default_cpus ({}) exceeds guest.max_cpus ({})",
                g.default_cpus, g.max_cpus
            )));
        }
        let default_mib = parse_memory_mib(&g.default_memory)
            .map_err(|e| Error::Config(format!("guest.default_memory: {e}")))?;
        let max_mib = parse_memory_mib(&g.max_memory)
            .map_err(|e| Error::Config(format!("guest.max_memory: {e}")))?;
        if default_mib > max_mib {
            return Err(Error::Config(format!(
                "guest.default_memory ({}) exceeds guest.max_memory ({})",
                g.default_memory, g.max_memory
            )));
        }
        let hugepage_size = self.memory.hugepage_size_bytes()?;
        if hugepage_size.is_some() && !self.memory.hugepages {
            return Err(Error::Config(
                "memory.hugepage_size is set but memory.hugepages is false".into(),
            ));
        }
        self.host.share_size_bytes()?;
        g.validate_gpu_keys()?;
        if self.timeouts.agent_connect_secs == 0 {
            return Err(Error::Config(
                "timeouts.agent_connect_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Which config file to read: containerd's runtime option `ConfigPath` wins, then the
/// `GPUVM_SHIM_CONFIG` environment variable, then [`DEFAULT_CONFIG_PATH`]. The flag says
/// whether the path was asked for explicitly (so a missing file is an error).
pub fn config_path(runtime_option: Option<&str>, env: Option<&str>) -> (PathBuf, bool) {
    match (runtime_option, env) {
        (Some(p), _) if !p.is_empty() => (PathBuf::from(p), true),
        (_, Some(p)) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    }
}

/// The size of one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSize {
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// Parses a memory quantity with Kubernetes' grammar (`8Gi`, `1.5Gi`, `1G`, `1e9`,
/// `1073741824`; `gpuvm_api::quantity`, the parser the operator uses too) into MiB,
/// rounding up to whole MiB. Zero is refused: a guest needs memory.
pub fn parse_memory_mib(value: &str) -> std::result::Result<u64, String> {
    let bytes = quantity::parse_bytes(value).map_err(|e| e.to_string())?;
    match bytes.div_ceil(1 << 20) {
        0 => Err(format!("{value:?} is less than 1 MiB")),
        mib => Ok(mib),
    }
}

/// What the scheduler accounted for a Pod, from the CRI sandbox annotations
/// ([`ANNOTATION_SANDBOX_CPU_PERIOD`] and the three others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodResources {
    /// The most vCPUs the Pod's CPU requests and limits allow: the smaller of the two
    /// (as millicores), in whole CPUs rounded down, at least 1 (a VM needs a vCPU).
    pub max_cpus: u32,
    /// The Pod's memory limit in bytes; `None` when its containers have none.
    pub memory_limit: Option<u64>,
}

impl PodResources {
    /// Reads the CRI sandbox annotations; `None` when containerd passed none (not a
    /// Kubernetes Pod, or a kubelet older than 1.23).
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Option<PodResources>> {
        let keys = [
            ANNOTATION_SANDBOX_CPU_PERIOD,
            ANNOTATION_SANDBOX_CPU_QUOTA,
            ANNOTATION_SANDBOX_CPU_SHARES,
            ANNOTATION_SANDBOX_MEMORY,
        ];
        if !keys.iter().any(|k| annotations.contains_key(*k)) {
            return Ok(None);
        }
        let number = |key: &str| -> Result<i64> {
            match annotations.get(key) {
                None => Ok(0),
                Some(text) => text.trim().parse::<i64>().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "annotation {key}: `{text}` is not a whole number"
                    ))
                }),
            }
        };
        let period = number(ANNOTATION_SANDBOX_CPU_PERIOD)?;
        let quota = number(ANNOTATION_SANDBOX_CPU_QUOTA)?;
        let shares = number(ANNOTATION_SANDBOX_CPU_SHARES)?;
        let memory = number(ANNOTATION_SANDBOX_MEMORY)?;
        // Millicores, rounded so that they never exceed what the Pod asked for:
        // shares = ⌊millicores × 1024 / 1000⌋, quota = ⌊millicores × period / 1000⌋.
        let request = (shares > 0).then(|| (i128::from(shares) * 1000).div_euclid(1024));
        let limit = (quota > 0 && period > 0)
            .then(|| (i128::from(quota) * 1000).div_euclid(i128::from(period)));
        let millis = match (request, limit) {
            (Some(r), Some(l)) => Some(r.min(l)),
            (r, l) => r.or(l),
        };
        let max_cpus = millis
            .map(|m| u32::try_from(m / 1000).unwrap_or(u32::MAX))
            .unwrap_or(1)
            .max(1);
        let memory_limit = u64::try_from(memory).ok().filter(|m| *m > 0);
        Ok(Some(PodResources {
            max_cpus,
            memory_limit,
        }))
    }
}

/// The guest size for a sandbox, never larger than what the scheduler accounted for:
///
/// - With the Pod's resources from containerd ([`PodResources`]): `gpuvm.dev/cpus`
///   must not exceed their CPUs, nor `gpuvm.dev/memory` their memory limit (compared
///   in bytes; the guest gets the annotation rounded up to whole MiB, but never more
///   whole MiB than the limit holds). Without an annotation the guest gets the Pod's
///   CPUs and its memory limit; a Pod without a memory limit gets
///   `guest.default_memory`, and a memory annotation on it is refused unless
///   `guest.allow_size_without_pod_resources`.
/// - Without them (not a Kubernetes Pod): the annotations are refused unless
///   `guest.allow_size_without_pod_resources`; the config's defaults otherwise.
///
/// Either way nothing exceeds `guest.max_cpus` / `guest.max_memory`. Every refusal is
/// `InvalidArgument` with a sentence that names the annotation.
pub fn guest_size(guest: &GuestConfig, annotations: &HashMap<String, String>) -> Result<GuestSize> {
    let asked_cpus =
        match annotations.get(ANNOTATION_CPUS) {
            Some(v) => Some(quantity::parse_cpus(v).map_err(|e| {
                Error::InvalidArgument(format!("annotation {ANNOTATION_CPUS}: {e}"))
            })?),
            None => None,
        };
    let asked_memory =
        match annotations.get(ANNOTATION_MEMORY) {
            Some(v) => Some(quantity::parse_bytes(v).map_err(|e| {
                Error::InvalidArgument(format!("annotation {ANNOTATION_MEMORY}: {e}"))
            })?),
            None => None,
        };
    let default_mib = parse_memory_mib(&guest.default_memory).map_err(Error::Config)?;
    let unaccounted = |key: &str, what: &str| {
        Error::InvalidArgument(format!(
            "annotation {key} asks for a VM size, but {what}, so nothing bounds it; a VM is \
             never larger than what the scheduler accounted for (set \
             guest.allow_size_without_pod_resources = true in the shim config to trust the \
             annotation outside Kubernetes)"
        ))
    };
    let pod = PodResources::from_annotations(annotations)?;
    let (cpus, memory_mib) = match pod {
        None => {
            if !guest.allow_size_without_pod_resources {
                let no_resources = "containerd passed no Pod resources \
                                    (io.kubernetes.cri.sandbox-cpu-*/-memory annotations)";
                if asked_cpus.is_some() {
                    return Err(unaccounted(ANNOTATION_CPUS, no_resources));
                }
                if asked_memory.is_some() {
                    return Err(unaccounted(ANNOTATION_MEMORY, no_resources));
                }
            }
            let memory_mib = match asked_memory {
                Some(bytes) => bytes_to_mib(bytes, ANNOTATION_MEMORY)?,
                None => default_mib,
            };
            (asked_cpus.unwrap_or(guest.default_cpus), memory_mib)
        }
        Some(pod) => {
            let cpus = match asked_cpus {
                Some(cpus) if cpus > pod.max_cpus => {
                    return Err(Error::InvalidArgument(format!(
                        "annotation {ANNOTATION_CPUS} asks for {cpus} CPUs, more than the {} the \
                         Pod's CPU requests and limits account for",
                        pod.max_cpus
                    )));
                }
                Some(cpus) => cpus,
                None => pod.max_cpus,
            };
            let memory_mib = match (asked_memory, pod.memory_limit) {
                (Some(bytes), Some(limit)) if bytes > limit => {
                    return Err(Error::InvalidArgument(format!(
                        "annotation {ANNOTATION_MEMORY} asks for {bytes} bytes, more than the \
                         Pod's memory limit of {limit} bytes"
                    )));
                }
                (Some(bytes), Some(limit)) => {
                    bytes_to_mib(bytes, ANNOTATION_MEMORY)?.min(bytes_to_mib_down(limit)?)
                }
                (Some(_), None) if !guest.allow_size_without_pod_resources => {
                    return Err(unaccounted(
                        ANNOTATION_MEMORY,
                        "the Pod has no memory limit",
                    ));
                }
                (Some(bytes), None) => bytes_to_mib(bytes, ANNOTATION_MEMORY)?,
                (None, Some(limit)) => bytes_to_mib_down(limit)?,
                (None, None) => default_mib,
            };
            (cpus, memory_mib)
        }
    };
    if cpus > guest.max_cpus {
        return Err(Error::InvalidArgument(format!(
            "{} asks for {cpus} CPUs, more than the configured maximum of {}",
            source_of(asked_cpus.is_some(), ANNOTATION_CPUS),
            guest.max_cpus
        )));
    }
    let max_mib = parse_memory_mib(&guest.max_memory).map_err(Error::Config)?;
    if memory_mib > max_mib {
        return Err(Error::InvalidArgument(format!(
            "{} asks for {memory_mib} MiB, more than the configured maximum of {} ({max_mib} MiB)",
            source_of(asked_memory.is_some(), ANNOTATION_MEMORY),
            guest.max_memory
        )));
    }
    Ok(GuestSize { cpus, memory_mib })
}

/// Where a size came from, for an error message.
fn source_of(annotated: bool, key: &str) -> String {
    if annotated {
        format!("annotation {key}")
    } else {
        "the Pod's resources".to_owned()
    }
}

/// Bytes to whole MiB, rounded up; zero refused.
fn bytes_to_mib(bytes: u64, key: &str) -> Result<u64> {
    match bytes.div_ceil(1 << 20) {
        0 => Err(Error::InvalidArgument(format!(
            "annotation {key}: {bytes} bytes is less than 1 MiB"
        ))),
        mib => Ok(mib),
    }
}

/// A memory limit in whole MiB, rounded down (the VM never exceeds it); zero refused.
fn bytes_to_mib_down(limit: u64) -> Result<u64> {
    match limit >> 20 {
        0 => Err(Error::InvalidArgument(format!(
            "the Pod's memory limit of {limit} bytes is less than 1 MiB, too small for a VM"
        ))),
        mib => Ok(mib),
    }
}

/// Parses the `gpuvm.dev/devices` annotation into PCI addresses (`0000:3b:00.0`), with
/// the one parser of that annotation (`gpuvm_api::keys::parse_device_addresses`),
/// rejecting anything that isn't one.
pub fn parse_devices(value: &str) -> Result<Vec<PciAddress>> {
    gpuvm_api::keys::parse_device_addresses(value)
        .map_err(|e| Error::InvalidArgument(format!("annotation {ANNOTATION_DEVICES}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn memory_quantities() {
        let cases: &[(&str, std::result::Result<u64, ()>)] = &[
            ("8Gi", Ok(8192)),
            ("512Mi", Ok(512)),
            ("1Ti", Ok(1 << 20)),
            ("2048Ki", Ok(2)),
            ("1G", Ok(954)), // 1e9 bytes = 953.67 MiB, rounded up
            ("1500M", Ok(1431)),
            ("1073741824", Ok(1024)),
            ("1", Ok(1)), // one byte still needs one MiB
            ("", Err(())),
            ("Gi", Err(())),
            ("8GB", Err(())),
            ("-1Gi", Err(())),
            // Kubernetes' full grammar, as the CRD and the operator accept it.
            ("1.5Gi", Ok(1536)),
            ("0.5Gi", Ok(512)),
            ("1e9", Ok(954)),
            ("1E3Mi", Err(())),
            ("134217728000m", Ok(128)),
            ("+128Mi", Ok(128)),
            ("0", Err(())),
            ("99999999999999999999999999999999999999999Pi", Err(())),
        ];
        for (input, want) in cases {
            assert_eq!(parse_memory_mib(input).map_err(|_| ()), *want, "{input:?}");
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    type SizeCase<'a> = (
        &'a [(&'a str, &'a str)],
        std::result::Result<(u32, u64), &'a str>,
    );

    #[test]
    fn guest_size_from_annotations_within_limits() {
        let guest = GuestConfig {
            default_cpus: 2,
            default_memory: "2Gi".into(),
            max_cpus: 8,
            max_memory: "16Gi".into(),
            // Outside Kubernetes: the annotations alone (the Pod-resource rules are
            // `guest_size_within_the_pod_s_resources`).
            allow_size_without_pod_resources: true,
            ..GuestConfig::default()
        };
        let cases: &[SizeCase<'_>] = &[
            (&[], Ok((2, 2048))),
            (&[(ANNOTATION_CPUS, "4")], Ok((4, 2048))),
            (&[(ANNOTATION_MEMORY, "8Gi")], Ok((2, 8192))),
            (
                &[(ANNOTATION_CPUS, "8"), (ANNOTATION_MEMORY, "16Gi")],
                Ok((8, 16384)),
            ),
            (
                &[(ANNOTATION_CPUS, "9")],
                Err("more than the configured maximum of 8"),
            ),
            (
                &[(ANNOTATION_MEMORY, "17Gi")],
                Err("more than the configured maximum of 16Gi"),
            ),
            (&[(ANNOTATION_MEMORY, "lots")], Err("gpuvm.dev/memory")),
            (&[(ANNOTATION_CPUS, "")], Err("gpuvm.dev/cpus")),
        ];
        for (pairs, want) in cases {
            let got = guest_size(&guest, &annotations(pairs));
            match (got, want) {
                (Ok(size), Ok((cpus, mib))) => {
                    assert_eq!((size.cpus, size.memory_mib), (*cpus, *mib), "{pairs:?}")
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{pairs:?}: {e}");
                    assert_eq!(
                        e.code(),
                        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
                    );
                }
                (got, want) => panic!("{pairs:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// The CRI sandbox annotations kubelet + containerd give a Pod whose containers
    /// request `request_millis` CPU and are limited to `limit_millis` CPU and
    /// `memory` bytes (0: no limit), as kubelet computes them (period 100 ms).
    fn pod(request_millis: i64, limit_millis: i64, memory: i64) -> Vec<(&'static str, String)> {
        let period = 100_000;
        let quota = if limit_millis == 0 {
            0
        } else {
            (limit_millis * period / 1000).max(1000)
        };
        vec![
            (ANNOTATION_SANDBOX_CPU_PERIOD, period.to_string()),
            (ANNOTATION_SANDBOX_CPU_QUOTA, quota.to_string()),
            (
                ANNOTATION_SANDBOX_CPU_SHARES,
                (request_millis * 1024 / 1000).max(2).to_string(),
            ),
            (ANNOTATION_SANDBOX_MEMORY, memory.to_string()),
        ]
    }

    #[test]
    fn guest_size_within_the_pod_s_resources() {
        const GI: i64 = 1 << 30;
        let strict = GuestConfig {
            default_cpus: 2,
            default_memory: "2Gi".into(),
            max_cpus: 8,
            max_memory: "16Gi".into(),
            ..GuestConfig::default()
        };
        let trusting = GuestConfig {
            allow_size_without_pod_resources: true,
            ..strict.clone()
        };
        type Case<'a> = (
            &'a str,
            &'a GuestConfig,
            Vec<(&'a str, String)>,
            std::result::Result<(u32, u64), &'a str>,
        );
        let with = |pod: Vec<(&'static str, String)>, pairs: &[(&'static str, &str)]| {
            let mut all = pod;
            all.extend(pairs.iter().map(|(k, v)| (*k, (*v).to_owned())));
            all
        };
        let cases: Vec<Case<'_>> = vec![
            (
                "the operator's Pod",
                &strict,
                with(
                    pod(4000, 4000, 8 * GI),
                    &[(ANNOTATION_CPUS, "4"), (ANNOTATION_MEMORY, "8Gi")],
                ),
                Ok((4, 8192)),
            ),
            (
                "smaller than the Pod",
                &strict,
                with(
                    pod(4000, 4000, 8 * GI),
                    &[(ANNOTATION_CPUS, "2"), (ANNOTATION_MEMORY, "1Gi")],
                ),
                Ok((2, 1024)),
            ),
            (
                "sized from the Pod alone",
                &strict,
                pod(3000, 3000, 3 * GI),
                Ok((3, 3072)),
            ),
            (
                "requests below limits: the requests count",
                &strict,
                pod(1000, 4000, GI),
                Ok((1, 1024)),
            ),
            (
                "a fractional request rounds down",
                &strict,
                pod(2500, 0, GI),
                Ok((2, 1024)),
            ),
            (
                "no CPU request or limit: one vCPU",
                &strict,
                pod(0, 0, GI),
                Ok((1, 1024)),
            ),
            (
                "a limit that is not whole MiB rounds down",
                &strict,
                pod(1000, 1000, 200_000_000),
                Ok((1, 190)),
            ),
            (
                "the annotation is rounded up but not past the limit",
                &strict,
                with(pod(1000, 1000, 200_000_000), &[(ANNOTATION_MEMORY, "200M")]),
                Ok((1, 190)),
            ),
            (
                "no memory limit: the default",
                &strict,
                pod(1000, 0, 0),
                Ok((1, 2048)),
            ),
            (
                "more CPUs than requested",
                &strict,
                with(pod(2000, 8000, 8 * GI), &[(ANNOTATION_CPUS, "3")]),
                Err(
                    "asks for 3 CPUs, more than the 2 the Pod's CPU requests and limits account for",
                ),
            ),
            (
                "more CPUs than the limit",
                &strict,
                with(pod(8000, 2000, 8 * GI), &[(ANNOTATION_CPUS, "3")]),
                Err("more than the 2 the Pod's CPU requests"),
            ),
            (
                "a tiny Pod claiming a big VM",
                &strict,
                with(pod(0, 0, 0), &[(ANNOTATION_CPUS, "8")]),
                Err("asks for 8 CPUs, more than the 1"),
            ),
            (
                "more memory than the limit",
                &strict,
                with(pod(1000, 1000, GI), &[(ANNOTATION_MEMORY, "1025Mi")]),
                Err(
                    "asks for 1074790400 bytes, more than the Pod's memory limit of 1073741824 bytes",
                ),
            ),
            (
                "memory on a Pod without a limit",
                &strict,
                with(pod(1000, 0, 0), &[(ANNOTATION_MEMORY, "1Gi")]),
                Err("but the Pod has no memory limit"),
            ),
            (
                "memory on a Pod without a limit, trusted",
                &trusting,
                with(pod(1000, 0, 0), &[(ANNOTATION_MEMORY, "1Gi")]),
                Ok((1, 1024)),
            ),
            (
                "no Pod resources",
                &strict,
                vec![(ANNOTATION_CPUS, "1".into())],
                Err("but containerd passed no Pod resources"),
            ),
            (
                "no Pod resources, memory",
                &strict,
                vec![(ANNOTATION_MEMORY, "1Gi".into())],
                Err("annotation gpuvm.dev/memory asks for a VM size"),
            ),
            (
                "no Pod resources, no annotations: the defaults",
                &strict,
                vec![],
                Ok((2, 2048)),
            ),
            (
                "a Pod past the configured maximum",
                &strict,
                pod(16000, 16000, GI),
                Err("the Pod's resources asks for 16 CPUs, more than the configured maximum of 8"),
            ),
            (
                "a Pod's memory past the configured maximum",
                &strict,
                pod(1000, 1000, 32 * GI),
                Err("the Pod's resources asks for 32768 MiB"),
            ),
            (
                "a garbled resource annotation",
                &strict,
                vec![(ANNOTATION_SANDBOX_MEMORY, "lots".into())],
                Err("annotation io.kubernetes.cri.sandbox-memory: `lots` is not a whole number"),
            ),
        ];
        for (name, guest, pairs, want) in cases {
            let map: HashMap<String, String> =
                pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            match (guest_size(guest, &map), want) {
                (Ok(size), Ok((cpus, mib))) => {
                    assert_eq!((size.cpus, size.memory_mib), (cpus, mib), "{name}")
                }
                (Err(e), Err(needle)) => {
                    assert!(e.to_string().contains(needle), "{name}: {e}");
                    assert_eq!(
                        e.code(),
                        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT,
                        "{name}"
                    );
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let config = ShimConfig::parse("", Path::new("x.toml")).expect("valid");
        assert_eq!(config, ShimConfig::default());
        assert_eq!(config.backend, Backend::Auto);
        assert_eq!(config.guest.agent_port, 1024);
        assert_eq!(config.timeouts.agent_connect_secs, 60);
        assert_eq!(
            config.guest.gpu_initramfs,
            PathBuf::from("/usr/share/gpuvm/initramfs-gpu.img")
        );
        // The GPU image's modules are built for the one kernel.
        assert_eq!(
            config.guest.gpu_kernel(),
            ("guest.kernel", config.guest.kernel.as_path())
        );
        assert_eq!(
            config.guest.gpu_check_period(),
            Some(Duration::from_secs(60))
        );
        let boot_only = ShimConfig::parse("[guest]\ngpu_check_interval = 0", Path::new("x.toml"))
            .expect("valid");
        assert_eq!(boot_only.guest.gpu_check_period(), None);
    }

    #[test]
    fn full_file_parses() {
        let text = r#"
            backend = "qemu"
            log_level = "debug"
            [guest]
            kernel = "/k"
            initramfs = "/i"
            gpu_initramfs = "/gi"
            gpu_kernel = "/gk"
            gpu_check_interval = 30
            kernel_params = "quiet"
            default_cpus = 2
            default_memory = "512Mi"
            max_cpus = 4
            max_memory = "4Gi"
            agent_port = 2000
            [binaries]
            cloud_hypervisor = "/ch"
            qemu = "/q"
            virtiofsd = "/v"
            vhost_device_vsock = "/hv"
            [timeouts]
            agent_connect_secs = 5
            vm_shutdown_secs = 3
            [memory]
            prefault = true
            hugepages = true
            hugepage_size = "1Gi"
            [host]
            sysfs_root = "/tmp/sys"
            dev_root = "/tmp/dev"
            lock_dir = "/tmp/locks"
            health_dir = "/tmp/health"
            gpu_check_dir = "/tmp/gpu-check"
        "#;
        let c = ShimConfig::parse(text, Path::new("x.toml")).expect("valid");
        assert_eq!(c.backend, Backend::Qemu);
        assert_eq!(c.guest.kernel, PathBuf::from("/k"));
        assert_eq!(c.guest.agent_port, 2000);
        assert_eq!(c.guest.gpu_initramfs, PathBuf::from("/gi"));
        assert_eq!(c.guest.gpu_kernel(), ("guest.gpu_kernel", Path::new("/gk")));
        assert_eq!(c.guest.gpu_check_period(), Some(Duration::from_secs(30)));
        assert_eq!(c.binaries.vhost_device_vsock, PathBuf::from("/hv"));
        assert_eq!(c.timeouts.vm_shutdown_secs, 3);
        assert!(c.memory.prefault && c.memory.hugepages);
        assert_eq!(c.memory.hugepage_size_bytes().expect("size"), Some(1 << 30));
        assert_eq!(c.host.sysfs_root, PathBuf::from("/tmp/sys"));
        assert_eq!(c.host.gpu_check_dir, PathBuf::from("/tmp/gpu-check"));
    }

    #[test]
    fn host_paths_default_to_the_production_ones() {
        let host = HostPaths::default();
        assert_eq!(host.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(host.dev_root, PathBuf::from("/dev"));
        assert_eq!(host.lock_dir, PathBuf::from("/run/gpuvm/devices"));
        assert_eq!(host.health_dir, PathBuf::from("/run/gpuvm/health"));
        assert_eq!(host.gpu_check_dir, PathBuf::from("/run/gpuvm/gpu-check"));
        assert_eq!(
            MemoryBacking::default()
                .hugepage_size_bytes()
                .expect("none"),
            None
        );
    }

    #[test]
    fn bad_files_are_rejected() {
        let cases = [
            ("backend = \"xen\"", "invalid config file"),
            ("colour = \"blue\"", "invalid config file"),
            ("[guest]\ndefault_cpus = 0", "at least 1"),
            (
                "[guest]\ndefault_cpus = 9\nmax_cpus = 8",
                "exceeds guest.max_cpus",
            ),
            ("[guest]\nmax_memory = \"1Mi\"", "exceeds guest.max_memory"),
            ("[guest]\ndefault_memory = \"big\"", "guest.default_memory"),
            ("[timeouts]\nagent_connect_secs = 0", "agent_connect_secs"),
            (
                "[memory]\nhugepages = true\nhugepage_size = \"3Mi\"",
                "power of two",
            ),
            (
                "[memory]\nhugepages = true\nhugepage_size = \"2M\"",
                "power of two",
            ),
            ("[memory]\nhugepage_size = \"2Mi\"", "hugepages is false"),
            ("[host]\nsysfs = \"/x\"", "invalid config file"),
            (
                "[guest]\ngpu_initramfs = \"initramfs-gpu.img\"",
                "guest.gpu_initramfs (\"initramfs-gpu.img\") must be an absolute path",
            ),
            (
                "[guest]\ngpu_kernel = \"\"",
                "guest.gpu_kernel (\"\") must be an absolute path",
            ),
            (
                "[guest]\ngpu_check_interval = 1",
                "guest.gpu_check_interval (1) must be 0 (check at boot only) or between 5 and 86400 seconds",
            ),
            (
                "[guest]\ngpu_check_interval = 100000",
                "guest.gpu_check_interval (100000)",
            ),
            (
                "[guest]\ngpu_check_interval = \"60s\"",
                "invalid config file",
            ),
        ];
        for (text, needle) in cases {
            let err = ShimConfig::parse(text, Path::new("x.toml")).expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn config_path_precedence() {
        assert_eq!(
            config_path(Some("/opt/a.toml"), Some("/env.toml")),
            (PathBuf::from("/opt/a.toml"), true)
        );
        assert_eq!(
            config_path(None, Some("/env.toml")),
            (PathBuf::from("/env.toml"), true)
        );
        assert_eq!(
            config_path(Some(""), Some("/env.toml")),
            (PathBuf::from("/env.toml"), true)
        );
        assert_eq!(
            config_path(None, None),
            (PathBuf::from(DEFAULT_CONFIG_PATH), false)
        );
    }

    #[test]
    fn missing_default_file_gives_defaults_but_missing_explicit_file_fails() {
        let missing = Path::new("/nonexistent/gpuvm/shim.toml");
        assert_eq!(
            ShimConfig::load(missing, false).expect("defaults"),
            ShimConfig::default()
        );
        assert!(ShimConfig::load(missing, true).is_err());
    }

    #[test]
    fn devices_annotation() {
        let text = |list: Vec<PciAddress>| list.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            text(parse_devices("0000:3B:00.0, 0000:3c:00.1").expect("valid")),
            vec!["0000:3b:00.0".to_string(), "0000:3c:00.1".to_string()]
        );
        assert_eq!(parse_devices("").expect("empty"), Vec::<PciAddress>::new());
        // The short form lspci prints is one the PCI parser reads (domain 0).
        assert_eq!(
            text(parse_devices("3b:00.0").expect("short form")),
            vec!["0000:3b:00.0".to_string()]
        );
        for bad in ["0000:3b:00.8", "../../etc", "0000:3b:00", "not-a-bdf"] {
            let err = parse_devices(bad).expect_err(bad);
            assert!(
                err.to_string().contains("annotation gpuvm.dev/devices"),
                "{bad}: {err}"
            );
            assert_eq!(
                err.code(),
                containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
            );
        }
    }
}
