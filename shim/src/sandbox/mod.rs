//! One pod sandbox: its VM, the agent in it and the devices passed to it. Boot and
//! teardown live here; the Task service only translates ttrpc calls onto them.
//!
//! Everything a start sets up on the host is owned by one [`Vm`] from the moment the
//! devices are locked, and [`Vm::stop`] is the one way it is undone: after a failed
//! start (whatever step failed, before or after the VMM started) and at teardown.

mod container;
mod spec;
mod tasks;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gpuvm_pci::{GroupLock, PciAddress, Sysfs};

pub use container::{ContainerRequest, ContainerShare, process_spec};
pub use spec::{Flavour, NVIDIA_PARAM, RUN_DIR, vm_spec, work_dir};
pub use tasks::{Checked, Exit, NewContainer, ProcessView, Tasks};

use crate::agent::{Agent, GuestInfo, TtrpcAgent};
use crate::cgroup::PodCgroup;
use crate::config::{self, HostPaths, ShimConfig};
use crate::devices::Passthrough;
use crate::error::{Error, Result};
use crate::gpu_check;
use crate::hypervisor::{self, Hypervisor, VmRecord, VmSpec};
use crate::network::PodNetwork;
use crate::persist::{SandboxRecord, StartTimings};
use crate::rootfs::ShareDirs;

/// Guest mount point of the virtio-fs share when the agent doesn't say.
pub const DEFAULT_GUEST_SHARED_DIR: &str = "/run/gpuvm/shared";

/// Locks of devices whose reset failed after their VM: held until the shim exits, so
/// no other sandbox takes them meanwhile (the health record keeps them out after).
#[derive(Debug, Default)]
pub struct FailedResetLocks(std::sync::Mutex<Vec<GroupLock>>);

impl FailedResetLocks {
    fn keep(&self, lock: GroupLock) {
        match self.0.lock() {
            Ok(mut held) => held.push(lock),
            Err(poisoned) => poisoned.into_inner().push(lock),
        }
    }
}

/// The VFIO devices passed to a VM, with their lock.
#[derive(Debug)]
struct Devices {
    /// Host paths for the reset after the VM.
    host: HostPaths,
    passthrough: Option<Passthrough>,
    /// Held for the VM's whole life.
    lock: std::sync::Mutex<Option<GroupLock>>,
}

impl Devices {
    /// Checks the devices the pod asks for, locks them and (after an earlier failed
    /// reset) resets them again, before anything starts.
    fn claim(
        config: &ShimConfig,
        annotations: &HashMap<String, String>,
        id: &str,
    ) -> Result<Devices> {
        let host = config.host.clone();
        let requested = match annotations.get(config::ANNOTATION_DEVICES) {
            Some(v) => config::parse_devices(v)?,
            None => Vec::new(),
        };
        if requested.is_empty() {
            return Ok(Devices::none(host));
        }
        let sysfs = Sysfs::new(&host.sysfs_root);
        let set = crate::devices::check_devices(&sysfs, &host.dev_root, &requested)?;
        let lock = crate::devices::lock_devices(&host.lock_dir, &set.devices, id)?;
        crate::devices::retry_failed_resets(&sysfs, &host.health_dir, &set.devices)?;
        tracing::info!(sandbox = id, devices = ?set.device_names(), "devices checked and locked");
        Ok(Devices {
            host,
            passthrough: Some(set),
            lock: std::sync::Mutex::new(Some(lock)),
        })
    }

    /// What the state file records of the devices, for `shim delete`.
    fn record(&self) -> Option<crate::devices::DeviceRecord> {
        self.passthrough
            .as_ref()
            .map(|set| crate::devices::DeviceRecord {
                devices: set.devices.clone(),
                sysfs_root: self.host.sysfs_root.clone(),
                lock_dir: self.host.lock_dir.clone(),
                health_dir: self.host.health_dir.clone(),
            })
    }

    /// Marks every device as needing its reset, before the VMM may open it: from now
    /// on only a reset frees it, even if this shim is killed (`shim delete` resets it).
    fn mark_reset_pending(&self, id: &str) -> Result<()> {
        match &self.passthrough {
            Some(set) => crate::devices::mark_reset_pending(&self.host.lock_dir, &set.devices, id),
            None => Ok(()),
        }
    }

    /// No devices.
    fn none(host: HostPaths) -> Devices {
        Devices {
            host,
            passthrough: None,
            lock: std::sync::Mutex::new(None),
        }
    }

    /// Resets every device after its VM, then releases the lock; the lock of a set
    /// whose reset failed goes to `held` instead.
    async fn reset_and_release(&self, held: &FailedResetLocks) {
        let Some(set) = &self.passthrough else {
            return;
        };
        let lock = match self.lock.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let all_reset = reset_devices(self.host.clone(), set.devices.clone()).await;
        // Reset (or recorded unhealthy, which keeps them out): the markers go, while
        // the lock is still held.
        crate::devices::clear_reset_pending(&self.host.lock_dir, &set.devices);
        if let (false, Some(lock)) = (all_reset, lock) {
            held.keep(lock);
        }
    }
}

/// Resets `devices` after their VM (off the async threads: sysfs resets block);
/// true when every reset succeeded.
async fn reset_devices(host: HostPaths, devices: Vec<PciAddress>) -> bool {
    let outcome = tokio::task::spawn_blocking(move || {
        crate::devices::reset_after_exit(&Sysfs::new(&host.sysfs_root), &host.health_dir, &devices)
    })
    .await;
    match outcome {
        Ok(outcome) => {
            tracing::info!(reset = ?outcome.reset, failed = ?outcome.failed, "devices reset after the VM");
            outcome.failed.is_empty()
        }
        Err(e) => {
            tracing::error!(error = %e, "the device reset panicked");
            false
        }
    }
}

/// The sandbox's network as its OCI spec gives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxNet {
    /// The pod's network namespace (`linux.namespaces` network path); `None` for the
    /// host's network.
    pub netns: Option<PathBuf>,
    /// The pod's hostname (the spec's `hostname`).
    pub hostname: String,
}

impl SandboxNet {
    /// The network of the sandbox whose OCI spec is `spec`.
    pub fn of(spec: &oci_spec::runtime::Spec) -> SandboxNet {
        SandboxNet {
            netns: crate::network::netns_path(spec),
            hostname: spec.hostname().clone().unwrap_or_default(),
        }
    }
}

/// Everything a sandbox's VM holds on the host: the VMM and its helpers, the shared
/// directory's mount, the taps in the pod's network namespace, the state file, the
/// devices and their lock.
#[derive(Debug)]
pub struct Vm {
    id: String,
    bundle: PathBuf,
    hypervisor: Box<dyn Hypervisor>,
    /// The virtio-fs share on the host (a tmpfs of its own, see [`ShareDirs`]).
    share: ShareDirs,
    /// The share's size limit in bytes (`host.share_size`).
    share_size: u64,
    devices: Devices,
    /// The pod network the VM joins (taps made in `bring_up`), and the hostname.
    network: Option<PodNetwork>,
    hostname: String,
    /// Set once the VMM was asked to start: from then on it may have opened the
    /// devices, so they are reset before they go back.
    vmm_started: AtomicBool,
    /// The pod's cgroup, which the VM's processes join; what the shim creates of it
    /// goes at teardown.
    cgroup: PodCgroup,
}

impl Vm {
    /// The VM `hypervisor` of sandbox `id`, holding `devices`; nothing starts yet.
    /// Its share is `shared/` in the VM's work dir (as [`vm_spec`] makes it).
    fn new(
        id: &str,
        bundle: &Path,
        hypervisor: Box<dyn Hypervisor>,
        devices: Devices,
        share_size: u64,
    ) -> Vm {
        Vm {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            share: ShareDirs::of(&hypervisor.record().work_dir),
            share_size,
            hypervisor,
            devices,
            network: None,
            hostname: String::new(),
            vmm_started: AtomicBool::new(false),
            cgroup: PodCgroup::default(),
        }
    }

    /// The VM, its processes in `cgroup`.
    fn with_cgroup(self, cgroup: PodCgroup) -> Vm {
        Vm { cgroup, ..self }
    }

    /// The VM joins `network` (its taps are made before the VMM starts, in it).
    fn with_network(mut self, network: Option<PodNetwork>, hostname: &str) -> Vm {
        self.network = network;
        hostname.clone_into(&mut self.hostname);
        self
    }

    /// The record for the state file: the VM's processes, then `mounts` (container
    /// rootfs mounts) and the share's own mount, unmounted in that order.
    fn state(
        &self,
        vm: VmRecord,
        mut mounts: Vec<PathBuf>,
        timings: StartTimings,
    ) -> SandboxRecord {
        mounts.extend(self.share.mount_points());
        SandboxRecord {
            sandbox_id: self.id.clone(),
            vm,
            mounts,
            timings,
            devices: self.devices.record(),
            cgroups: self.cgroup.to_create.clone(),
            network: self.network.as_ref().map(PodNetwork::record),
        }
    }

    /// Saves the state file with the VM's processes as they are now.
    fn save_state(&self) -> Result<()> {
        self.state(
            self.hypervisor.record(),
            Vec::new(),
            StartTimings::default(),
        )
        .save(&self.bundle)
    }

    /// Starts the VM and waits for its agent: every step that can fail after the
    /// devices are locked. The caller undoes it with [`Vm::stop`] on failure.
    async fn bring_up(&self, config: &ShimConfig) -> Result<(Arc<dyn Agent>, GuestInfo, Phases)> {
        // The state file names the cgroups before they exist: `shim delete` removes them.
        self.save_state()?;
        self.cgroup.create()?;
        // Rootfs mounts made under the share later must reach virtiofsd's namespace.
        crate::rootfs::mount_share(&self.share, self.share_size)?;
        let vmm_starting = Instant::now();
        let persist = |vm: &VmRecord| {
            let record = self.state(vm.clone(), Vec::new(), StartTimings::default());
            if let Err(e) = record.save(&self.bundle) {
                tracing::warn!(error = %e, "cannot update the state file");
            }
        };
        // The state file names the devices already: a shim killed from here on
        // leaves `shim delete` what it needs to reset them.
        self.vmm_started.store(true, Ordering::SeqCst);
        self.devices.mark_reset_pending(&self.id)?;
        // The state file names the taps already: a failure part way is undone too.
        if let Some(network) = self.network.clone() {
            blocking(move || network.attach()).await?;
        }
        self.hypervisor.start(&persist).await?;
        let vmm_started = Instant::now();
        self.save_state()?;
        let agent = self.connect_agent(config).await?;
        let connected = Instant::now();
        let info = agent.guest_info().await?;
        if let Some(network) = &self.network {
            agent
                .configure_network(&network.guest(&self.hostname))
                .await?;
        }
        let phases = Phases {
            vmm_starting,
            vmm_started,
            connected,
            ready: Instant::now(),
        };
        Ok((agent, info, phases))
    }

    /// Connects to the agent on vsock, unless the VM exits first.
    async fn connect_agent(&self, config: &ShimConfig) -> Result<Arc<dyn Agent>> {
        let timeout = Duration::from_secs(config.timeouts.agent_connect_secs);
        let socket = self.hypervisor.vsock_socket();
        let connected = tokio::select! {
            stream = crate::vsock::connect(&socket, config.guest.agent_port, timeout) => stream,
            exit = self.hypervisor.wait_exit() => Err(Error::Hypervisor(format!(
                "the VM exited with code {} before its agent answered", exit.vmm_exit_code
            ))),
        };
        match connected {
            Ok(stream) => Ok(Arc::new(TtrpcAgent::new(stream, timeout))),
            // Say which setting to look at: the agent must be the initramfs's /init
            // and listen on guest.agent_port; timeouts.agent_connect_secs bounds it.
            Err(Error::Timeout { what, secs }) => Err(Error::Timeout {
                what: format!(
                    "the guest agent to answer on {what} \
                     (is the agent /init of the initramfs? see timeouts.agent_connect_secs)"
                ),
                secs,
            }),
            Err(e) => Err(e),
        }
    }

    /// Undoes everything the VM holds, whatever state it is in: VM shutdown, helpers
    /// stopped, `mounts` (container rootfs mounts) and the share unmounted before the
    /// work dir is removed (removing through a rootfs mount would delete the
    /// container's image data), devices reset and released, state file removed.
    /// Idempotent.
    pub async fn stop(&self, mounts: Vec<PathBuf>, held: &FailedResetLocks) {
        if let Err(e) = self.hypervisor.shutdown().await {
            tracing::warn!(error = %e, "VM shutdown failed");
        }
        for mount in mounts {
            crate::rootfs::unmount(&mount);
        }
        for point in self.share.mount_points() {
            crate::rootfs::unmount(&point);
        }
        self.hypervisor.cleanup().await;
        // The VMM is gone: its taps and the redirects go.
        if let Some(record) = self.network.as_ref().map(PodNetwork::record) {
            let _ = blocking(move || {
                record.detach();
                Ok(())
            })
            .await;
        }
        let cgroups = self.cgroup.to_create.clone();
        if let Err(e) =
            tokio::task::spawn_blocking(move || crate::cgroup::remove_created(&cgroups)).await
        {
            tracing::warn!(error = %e, "the cgroup removal panicked");
        }
        // The VMM has exited: reset every device, then release its lock. A device
        // that fails its reset got a health record; its lock stays held until the
        // shim exits.
        if self.vmm_started.load(Ordering::SeqCst) {
            self.devices.reset_and_release(held).await;
        }
        SandboxRecord::remove(&self.bundle);
    }
}

/// When each start phase ended.
#[derive(Debug, Clone, Copy)]
struct Phases {
    vmm_starting: Instant,
    vmm_started: Instant,
    connected: Instant,
    ready: Instant,
}

/// The start timings and whether the first app container has started.
#[derive(Debug, Default)]
struct StartClock {
    timings: StartTimings,
    first_container_started: bool,
}

/// A running sandbox: the VM and the agent in it.
#[derive(Debug)]
pub struct Sandbox {
    vm: Vm,
    agent: Arc<dyn Agent>,
    shared_guest: String,
    /// How long the agent gets to shut down at teardown.
    shutdown_timeout: Duration,
    /// Where the start time went; `container_ms` is filled by the first app container.
    timings: std::sync::Mutex<StartClock>,
    /// The periodic GPU check, for a sandbox with GPUs and a `guest.gpu_check_interval`.
    gpu_check: std::sync::Mutex<Option<GpuCheckTask>>,
}

impl Sandbox {
    /// Boots the VM for sandbox `id` (bundle `bundle`, OCI spec `oci`) and connects to
    /// its agent. The config comes from containerd's runtime option `config_option`,
    /// else the environment, else the default path. Nothing is left behind on failure.
    pub async fn boot(
        id: &str,
        bundle: &Path,
        oci: &oci_spec::runtime::Spec,
        config_option: Option<String>,
        held: &FailedResetLocks,
    ) -> Result<Sandbox> {
        let entered = Instant::now();
        let annotations = &oci.annotations().clone().unwrap_or_default();
        let net = SandboxNet::of(oci);
        let cgroups_path = oci.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        let cgroup = PodCgroup::plan(cgroups_path.as_deref().and_then(Path::to_str))?;
        let env = std::env::var(config::CONFIG_ENV).ok();
        let (path, explicit) = config::config_path(config_option.as_deref(), env.as_deref());
        let config = ShimConfig::load(&path, explicit)?;
        require_file("guest kernel", "guest.kernel", &config.guest.kernel)?;
        require_file(
            "guest initramfs",
            "guest.initramfs",
            &config.guest.initramfs,
        )?;
        let network = match net.netns.clone() {
            Some(netns) => blocking(move || PodNetwork::scan(&netns)).await?,
            None => None,
        };
        let devices = Devices::claim(&config, annotations, id)?;
        if Flavour::of(devices.passthrough.as_ref()) == Flavour::Gpu {
            require_gpu_images(&config)?;
        }
        let gpu_nodes: Vec<Option<u32>> = devices
            .passthrough
            .iter()
            .flat_map(|set| set.gpus.iter().map(|gpu| gpu.numa_node))
            .collect();
        let mut spec = VmSpec {
            cgroups: cgroup.join_dirs(),
            numa: crate::numa::placement(&config.host.sysfs_root, &gpu_nodes)?,
            ..vm_spec(&config, annotations, devices.passthrough.as_ref(), id)?
        };
        if let Some(network) = &network {
            spec.nics = network.nics();
            spec.netns = Some(network.netns.clone());
        }
        let hypervisor = hypervisor::new_hypervisor(&config, spec);
        let share_size = config.host.share_size_bytes()?;
        let vm = Vm::new(id, bundle, hypervisor, devices, share_size)
            .with_cgroup(cgroup)
            .with_network(network, &net.hostname);
        Sandbox::launch(vm, &config, annotations, held, entered).await
    }

    /// Brings `vm` up; on any failure stops it (one cleanup path) and returns the error.
    async fn launch(
        vm: Vm,
        config: &ShimConfig,
        annotations: &HashMap<String, String>,
        held: &FailedResetLocks,
        entered: Instant,
    ) -> Result<Sandbox> {
        let (agent, info, phases) = match vm.bring_up(config).await {
            Ok(up) => up,
            Err(e) => {
                vm.stop(Vec::new(), held).await;
                return Err(e);
            }
        };
        tracing::info!(sandbox = %vm.id, kernel = %info.kernel_release, agent = %info.agent_version, "guest agent ready");
        let gpu_check = match &vm.devices.passthrough {
            Some(set) => {
                let period = config.guest.gpu_check_period();
                check_guest_gpus(&vm.devices.host, set, &agent, annotations, period).await
            }
            None => None,
        };
        let shared_guest = if info.shared_dir.is_empty() {
            DEFAULT_GUEST_SHARED_DIR.to_owned()
        } else {
            info.shared_dir
        };
        let timings = StartTimings {
            // The shim's own work: before the VMM starts and after the agent is ready.
            shim_ms: StartTimings::millis(entered, phases.vmm_starting)
                + StartTimings::millis(phases.ready, Instant::now()),
            vmm_ms: StartTimings::millis(phases.vmm_starting, phases.vmm_started),
            boot_ms: StartTimings::millis(phases.vmm_started, phases.connected),
            agent_ms: StartTimings::millis(phases.connected, phases.ready),
            container_ms: 0,
        };
        Ok(Sandbox {
            vm,
            agent,
            shared_guest,
            shutdown_timeout: Duration::from_secs(config.timeouts.vm_shutdown_secs),
            timings: std::sync::Mutex::new(StartClock {
                timings,
                first_container_started: false,
            }),
            gpu_check: std::sync::Mutex::new(gpu_check),
        })
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.vm.id
    }

    /// The agent in the guest.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    /// The VMM's pid: every task reports it (guest pids mean nothing on the host, and
    /// containerd reads `/proc/<pid>` of the tasks it tracks).
    pub fn vmm_pid(&self) -> u32 {
        self.vm.hypervisor.pid().unwrap_or(0)
    }

    /// Resolves when the VM has exited (guest power-off, crash, shutdown).
    pub async fn wait_exit(&self) -> hypervisor::VmExit {
        self.vm.hypervisor.wait_exit().await
    }

    /// Container `id`'s directory on the shim's side of the share (`mounts/<id>`): its
    /// rootfs mount at `rootfs`, its volumes under `volumes/`.
    pub fn container_host(&self, container_id: &str) -> PathBuf {
        self.vm.share.mounts.join(container_id)
    }

    /// Where container `id`'s rootfs is in the guest.
    pub fn rootfs_guest(&self, container_id: &str) -> String {
        format!("{}/{container_id}/rootfs", self.shared_guest)
    }

    /// Where container `id`'s volumes are in the guest (each bind numbered in it).
    pub fn volumes_guest(&self, container_id: &str) -> String {
        format!("{}/{container_id}/volumes", self.shared_guest)
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, StartClock> {
        match self.timings.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts `from..now` towards the first app container's start; `started` ends
    /// the count. Returns the complete timings when this call ended it.
    pub fn count_container_time(&self, from: Instant, started: bool) -> Option<StartTimings> {
        let mut clock = self.clock();
        if clock.first_container_started {
            return None;
        }
        clock.timings.container_ms += StartTimings::millis(from, Instant::now());
        clock.first_container_started = started;
        started.then_some(clock.timings)
    }

    /// Updates the state file: the VM's processes, the containers' host `mounts`
    /// (volumes and rootfs), the start timings. A failure is logged: the sandbox runs on.
    pub fn save_state(&self, mounts: Vec<PathBuf>) {
        let timings = self.clock().timings;
        let record = self.vm.state(self.vm.hypervisor.record(), mounts, timings);
        if let Err(e) = record.save(&self.vm.bundle) {
            tracing::warn!(error = %e, "cannot update the state file");
        }
    }

    /// Tears the sandbox down: agent shutdown, then [`Vm::stop`]. Idempotent.
    pub async fn stop(&self, mounts: Vec<PathBuf>, held: &FailedResetLocks) {
        // The GPU check ends first: a round against a guest going down would record
        // a failure that is only the teardown.
        let task = match self.gpu_check.lock() {
            Ok(mut task) => task.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(task);
        let _ = tokio::time::timeout(self.shutdown_timeout, self.agent.shutdown()).await;
        self.vm.stop(mounts, held).await;
        tracing::info!(sandbox = %self.vm.id, "sandbox torn down");
    }
}

/// Runs blocking `work` (netlink in another namespace) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Hypervisor(format!("a blocking task failed: {e}")))?
}

/// Checks that a configured file exists, so a typo names the setting rather than
/// surfacing later as a VMM error or an agent timeout.
fn require_file(what: &str, setting: &str, path: &Path) -> Result<()> {
    require_file_or(&format!("the {what}"), setting, path, "")
}

/// [`require_file`] with the whole subject (`the …`) and a `hint` after the setting.
fn require_file_or(subject: &str, setting: &str, path: &Path, hint: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::VmConfig(format!(
            "{subject} {} does not exist (set {setting} in the shim config{hint})",
            path.display()
        )))
    }
}

/// Where the GPU check of a sandbox is recorded for the node agent
/// (`<gpu_check_dir>/<ns>_<name>`), and the Pod's UID; `path` is `None` for a sandbox
/// that is not a Kubernetes Pod.
#[derive(Debug, Clone)]
struct GpuCheckRecord {
    path: Option<PathBuf>,
    pod_uid: Option<String>,
}

impl GpuCheckRecord {
    /// The record of the Pod the CRI annotations name.
    fn of(host: &HostPaths, annotations: &HashMap<String, String>) -> GpuCheckRecord {
        let path = match (
            annotations.get(config::ANNOTATION_POD_NAMESPACE),
            annotations.get(config::ANNOTATION_POD_NAME),
        ) {
            (Some(namespace), Some(name)) => {
                let path = gpu_check::record_path(&host.gpu_check_dir, namespace, name);
                if path.is_none() {
                    tracing::warn!(
                        namespace,
                        name,
                        "no GPU check record for a pod with this name"
                    );
                }
                path
            }
            _ => None,
        };
        GpuCheckRecord {
            path,
            pod_uid: annotations.get(config::ANNOTATION_POD_UID).cloned(),
        }
    }

    /// Logs `check` and writes it; a failed write is logged (the sandbox runs on).
    fn write(&self, check: &gpu_check::GpuCheck) {
        match check {
            gpu_check::GpuCheck::Ok(summary) => tracing::info!(summary, "guest sees its GPUs"),
            gpu_check::GpuCheck::Failed(reason) => tracing::warn!(reason, "guest GPU check failed"),
        }
        let Some(path) = &self.path else {
            return;
        };
        if let Err(e) = gpu_check::write_record(path, check, self.pod_uid.as_deref()) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the GPU check record");
        }
    }
}

/// The periodic GPU check's task; aborted when dropped, so it ends with its sandbox.
#[derive(Debug)]
struct GpuCheckTask(tokio::task::JoinHandle<()>);

impl Drop for GpuCheckTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks the agent which GPUs the guest sees, compares them with what was passed, and
/// records the outcome for the node agent; then, with a `period`, repeats that in a
/// task ([`gpu_check::GpuMonitor`]: the record is rewritten when the outcome changes).
/// Never fails the sandbox: the operator reports a failure as `GPUReady=False`.
async fn check_guest_gpus(
    host: &HostPaths,
    set: &Passthrough,
    agent: &Arc<dyn Agent>,
    annotations: &HashMap<String, String>,
    period: Option<Duration>,
) -> Option<GpuCheckTask> {
    let ids: Vec<u16> = set.gpus.iter().map(|g| g.device_id).collect();
    let expected = gpu_check::expected_models(
        annotations
            .get(config::ANNOTATION_GPU_MODELS)
            .map(String::as_str),
        &ids,
    );
    let monitor = gpu_check::GpuMonitor::new(expected);
    let record = GpuCheckRecord::of(host, annotations);
    run_gpu_check(Arc::clone(agent), monitor, record, period).await
}

/// The boot round of `monitor`, then with a `period` the task of the later rounds;
/// each outcome that changed goes to `record`.
async fn run_gpu_check(
    agent: Arc<dyn Agent>,
    mut monitor: gpu_check::GpuMonitor,
    record: GpuCheckRecord,
    period: Option<Duration>,
) -> Option<GpuCheckTask> {
    if let Some(check) = monitor.observe(agent.gpu_info().await) {
        record.write(&check);
    }
    let period = period?;
    Some(GpuCheckTask(tokio::spawn(async move {
        let mut rounds = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // A round that overran (a slow NVML) is not made up for with a burst.
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            rounds.tick().await;
            if let Some(check) = monitor.observe(agent.gpu_info().await) {
                record.write(&check);
            }
        }
    })))
}

/// For a sandbox with GPUs: the GPU flavour's kernel and initramfs must exist. A GPU
/// VM without the NVIDIA driver is of no use, so a missing image fails the start,
/// naming the file and the key (a host that wants the small image for GPU pods says
/// so: `guest.gpu_initramfs` = `guest.initramfs`).
fn require_gpu_images(config: &ShimConfig) -> Result<()> {
    for (key, path) in Flavour::Gpu.images(config) {
        require_file_or(
            "the pod has GPUs, and the GPU guest image",
            key,
            &path,
            "; guest/build.sh --gpu builds the image with the NVIDIA driver, the chart \
             installs it as share/initramfs-gpu.img",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::sample_spec;
    use crate::hypervisor::{SpawnHook, VmHost, Vmm};
    use crate::process::WatchedProcess;
    use gpuvm_testkit::Requirement;

    /// A VMM whose VM is a real `sleep` process, started and stopped through the same
    /// [`VmHost`] as the real backends. With `break_bundle`, it removes the sandbox's
    /// bundle once it runs, so the state-file save right after the VMM started fails.
    #[derive(Debug)]
    struct SleepVmm {
        host: VmHost,
        break_bundle: Option<PathBuf>,
        started: Arc<std::sync::Mutex<Option<WatchedProcess>>>,
    }

    #[async_trait::async_trait]
    impl Vmm for SleepVmm {
        fn host(&self) -> &VmHost {
            &self.host
        }

        async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()> {
            self.host.create_work_dir()?;
            let sleep = Path::new("/bin/sleep");
            let mut cmd = tokio::process::Command::new(sleep);
            cmd.arg("600");
            let vmm = self.host.spawn_vmm(sleep, cmd, spawned)?;
            *self.started.lock().expect("lock") = Some(vmm);
            if let Some(bundle) = &self.break_bundle {
                std::fs::remove_dir_all(bundle).expect("remove the bundle");
            }
            Ok(())
        }

        async fn shutdown(&self) -> Result<()> {
            if let Some(vmm) = self.host.vmm() {
                vmm.stop(self.host.shutdown_timeout()).await;
            }
            Ok(())
        }
    }

    /// Launches a sleep VM for sandbox `pod1` under `dir`, its processes in `cgroup`;
    /// returns the launch's error, the VMM it started and the VM's work dir.
    async fn failed_launch(
        dir: &Path,
        break_bundle: bool,
        config: &ShimConfig,
        cgroup: PodCgroup,
    ) -> (Error, WatchedProcess, PathBuf) {
        let bundle = dir.join("bundle");
        std::fs::create_dir(&bundle).expect("bundle");
        let mut spec = sample_spec();
        spec.work_dir = dir.join("vm");
        spec.shared_dir = Some(ShareDirs::of(&spec.work_dir).shared);
        spec.cgroups = cgroup.join_dirs();
        let work_dir = spec.work_dir.clone();
        let started = Arc::new(std::sync::Mutex::new(None));
        let vmm = SleepVmm {
            host: VmHost::new(config, spec, "vmm"),
            break_bundle: break_bundle.then(|| bundle.clone()),
            started: started.clone(),
        };
        let vm = Vm::new(
            "pod1",
            &bundle,
            Box::new(vmm),
            Devices::none(config.host.clone()),
            16 << 20,
        )
        .with_cgroup(cgroup);
        let held = FailedResetLocks::default();
        let err = Sandbox::launch(vm, config, &HashMap::new(), &held, Instant::now())
            .await
            .expect_err("the launch fails");
        let vmm = started
            .lock()
            .expect("lock")
            .take()
            .expect("the VMM started");
        (err, vmm, work_dir)
    }

    /// The bind mount of the share needs root.
    fn can_mount() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        gpuvm_testkit::skip(Requirement::Root, "mounting the VM's share needs root");
        false
    }

    #[tokio::test]
    async fn a_state_file_failure_after_the_vmm_started_tears_the_vm_down() {
        if !can_mount() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (err, vmm, work_dir) = failed_launch(
            dir.path(),
            true,
            &ShimConfig::default(),
            PodCgroup::default(),
        )
        .await;
        assert!(
            matches!(&err, Error::Io { context, .. } if context.contains("gpuvm-state.json")),
            "{err:?}"
        );
        assert_eq!(vmm.exited().map(|e| e.code), Some(128 + libc::SIGTERM));
        assert!(
            !crate::rootfs::has_mounts_under(&work_dir),
            "share still mounted"
        );
        assert!(!work_dir.exists(), "work dir left behind");
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_tears_the_vm_down() {
        if !can_mount() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ShimConfig::default();
        config.timeouts.agent_connect_secs = 1;
        let (err, vmm, work_dir) =
            failed_launch(dir.path(), false, &config, PodCgroup::default()).await;
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert_eq!(vmm.exited().map(|e| e.code), Some(128 + libc::SIGTERM));
        assert!(
            !crate::rootfs::has_mounts_under(&work_dir),
            "share still mounted"
        );
        assert!(!work_dir.exists(), "work dir left behind");
        assert!(
            SandboxRecord::load(&dir.path().join("bundle"))
                .expect("load")
                .is_none(),
            "state file left behind"
        );
    }

    #[tokio::test]
    async fn a_failed_start_removes_the_pod_cgroup_it_created() {
        if !can_mount() {
            return;
        }
        // The host's real hierarchies: the VMM joins them, the teardown removes them.
        let top = format!("gpuvm-unit-{}", std::process::id());
        let cgroup = PodCgroup::plan(Some(&format!("/{top}/pod1"))).expect("plan");
        let created = cgroup.to_create.clone();
        assert!(!created.is_empty());
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ShimConfig::default();
        config.timeouts.agent_connect_secs = 1;
        let (err, vmm, _) = failed_launch(dir.path(), false, &config, cgroup).await;
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert_eq!(vmm.exited().map(|e| e.code), Some(128 + libc::SIGTERM));
        for dir in created {
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    /// An agent whose `GpuInfo` answers come from a script (the last one repeats),
    /// each once the test lets it through `gate`; every other call fails.
    #[derive(Debug)]
    struct ScriptedGpuAgent {
        answers: std::sync::Mutex<Vec<crate::agent::GpuReport>>,
        gate: tokio::sync::Semaphore,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl ScriptedGpuAgent {
        fn new(answers: Vec<crate::agent::GpuReport>) -> Arc<ScriptedGpuAgent> {
            Arc::new(ScriptedGpuAgent {
                answers: std::sync::Mutex::new(answers),
                gate: tokio::sync::Semaphore::new(0),
                calls: std::sync::atomic::AtomicUsize::new(0),
            })
        }

        /// Lets one more `GpuInfo` answer through, and waits until it was asked.
        async fn answer_once(&self) {
            let asked = self.calls.load(Ordering::SeqCst) + 1;
            self.gate.add_permits(1);
            eventually(|| self.calls.load(Ordering::SeqCst) >= asked).await;
        }
    }

    /// Waits (at most 10 s) until `done`.
    async fn eventually(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The answer to every call but `GpuInfo`.
    fn not_scripted<T>() -> Result<T> {
        Err(Error::AgentUnavailable("not scripted".into()))
    }

    #[async_trait::async_trait]
    impl Agent for ScriptedGpuAgent {
        async fn ping(&self) -> Result<String> {
            not_scripted()
        }
        async fn guest_info(&self) -> Result<GuestInfo> {
            not_scripted()
        }
        async fn gpu_info(&self) -> Result<crate::agent::GpuReport> {
            self.gate.acquire().await.expect("gate").forget();
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut answers = self.answers.lock().expect("answers");
            match answers.len() {
                0 => not_scripted(),
                1 => Ok(answers[0].clone()),
                _ => Ok(answers.remove(0)),
            }
        }
        async fn create_container(&self, _: &crate::agent::ContainerSpec) -> Result<()> {
            not_scripted()
        }
        async fn exec_process(
            &self,
            _: &crate::agent::ProcessId,
            _: &crate::agent::ProcessSpec,
        ) -> Result<()> {
            not_scripted()
        }
        async fn start_process(&self, _: &crate::agent::ProcessId) -> Result<u32> {
            not_scripted()
        }
        async fn signal_process(&self, _: &crate::agent::ProcessId, _: u32, _: bool) -> Result<()> {
            not_scripted()
        }
        async fn wait_process(
            &self,
            _: &crate::agent::ProcessId,
        ) -> Result<crate::agent::ExitInfo> {
            not_scripted()
        }
        async fn delete_process(&self, _: &crate::agent::ProcessId) -> Result<()> {
            not_scripted()
        }
        async fn read_output(
            &self,
            _: &crate::agent::ProcessId,
            _: crate::agent::OutputStream,
        ) -> Result<Option<Vec<u8>>> {
            not_scripted()
        }
        async fn write_stdin(&self, _: &crate::agent::ProcessId, _: &[u8]) -> Result<usize> {
            not_scripted()
        }
        async fn close_stdin(&self, _: &crate::agent::ProcessId) -> Result<()> {
            not_scripted()
        }
        async fn resize_terminal(&self, _: &crate::agent::ProcessId, _: u32, _: u32) -> Result<()> {
            not_scripted()
        }
        async fn pids(&self, _: &str) -> Result<Vec<u32>> {
            not_scripted()
        }
        async fn process_stats(
            &self,
            _: &crate::agent::ProcessId,
        ) -> Result<crate::agent::ProcessStats> {
            not_scripted()
        }
        async fn shutdown(&self) -> Result<()> {
            not_scripted()
        }
        async fn configure_network(&self, _: &crate::agent::GuestNetwork) -> Result<()> {
            not_scripted()
        }
    }

    /// What the guest of one H100 answers; with `gone`, the driver lost it.
    fn one_h100(gone: bool) -> crate::agent::GpuReport {
        crate::agent::GpuReport {
            gpus: if gone {
                Vec::new()
            } else {
                vec![crate::agent::GpuInfo {
                    name: "NVIDIA H100 80GB HBM3".into(),
                    uuid: "GPU-5f8b2c3e-1a2b-4c3d-9e8f-0123456789ab".into(),
                    pci_bus_id: "00000000:00:05.0".into(),
                }]
            },
            ..crate::agent::GpuReport::default()
        }
    }

    #[tokio::test]
    async fn the_gpu_check_task_records_changes_only_and_ends_with_its_sandbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = HostPaths {
            gpu_check_dir: dir.path().to_owned(),
            ..HostPaths::default()
        };
        let record = GpuCheckRecord::of(
            &host,
            &[
                (config::ANNOTATION_POD_NAMESPACE, "team-a"),
                (config::ANNOTATION_POD_NAME, "train-0"),
                (config::ANNOTATION_POD_UID, "uid-1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let path = dir.path().join("team-a_train-0");
        let agent = ScriptedGpuAgent::new(vec![one_h100(false), one_h100(false), one_h100(true)]);
        agent.gate.add_permits(1);
        let monitor = gpu_check::GpuMonitor::new(vec!["h100-80gb".into()]);
        let period = Some(Duration::from_millis(10));
        let task = run_gpu_check(agent.clone(), monitor, record, period)
            .await
            .expect("a period starts the task");
        let read = || std::fs::read_to_string(&path).ok();
        assert_eq!(
            read().as_deref(),
            Some("ok: 1 x h100-80gb\npod-uid: uid-1\n")
        );
        // The same outcome is not written again.
        std::fs::remove_file(&path).expect("remove");
        agent.answer_once().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read(), None);
        agent.answer_once().await;
        let gone = "failed: GPU GPU-5f8b2c3e-1a2b-4c3d-9e8f-0123456789ab (at 00000000:00:05.0) \
                    is gone from the guest, which sees 0 of the 1 GPUs it passed with\n\
                    pod-uid: uid-1\n";
        eventually(|| read().as_deref() == Some(gone)).await;
        drop(task);
        let calls = agent.calls.load(Ordering::SeqCst);
        agent.gate.add_permits(5);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            agent.calls.load(Ordering::SeqCst),
            calls,
            "rounds after the stop"
        );
        // Boot only: one round, no task.
        let once = ScriptedGpuAgent::new(vec![one_h100(false)]);
        once.gate.add_permits(2);
        let none = GpuCheckRecord {
            path: None,
            pod_uid: None,
        };
        let monitor = gpu_check::GpuMonitor::new(vec!["h100-80gb".into()]);
        assert!(
            run_gpu_check(once.clone(), monitor, none, None)
                .await
                .is_none()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(once.calls.load(Ordering::SeqCst), 1);
    }
}
