//! The containerd Task service: a thin ttrpc layer over methods that return the
//! crate's own `Result`. One [`Service`] per shim process, one sandbox (VM) per shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{TtrpcResult, api::Empty};
use tokio::sync::{Mutex, watch};
use tracing::instrument;

use crate::agent::{Agent, ContainerSpec, Mount as AgentMount, ProcessId, ProcessSpec, TtrpcAgent};
use crate::config::{self, HostPaths, ShimConfig};
use crate::devices::Passthrough;
use crate::error::{Error, Result};
use crate::hypervisor::{self, Hypervisor, VmSpec};
use crate::persist::{SandboxRecord, StartTimings};
use crate::state::{TaskAction, TaskState};
use crate::stdio::{StdioCopy, StdioPaths};
use gpuvm_pci::{GroupLock, Sysfs};

/// Annotation naming the pod sandbox a container belongs to.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation saying whether a container is the pod's sandbox (`sandbox`) or an app
/// container (`container`).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Where the VM's private directories live on the host.
pub const RUN_DIR: &str = "/run/gpuvm";
/// Guest mount point of the virtio-fs share when the agent doesn't say.
pub const DEFAULT_GUEST_SHARED_DIR: &str = "/run/gpuvm/shared";

/// The sandbox grouping for a container: its `sandbox-id` annotation, or its own id
/// (a `ctr run` container is its own sandbox).
pub fn sandbox_id_of(container_id: &str, annotations: &HashMap<String, String>) -> String {
    annotations
        .get(ANNOTATION_SANDBOX_ID)
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_owned())
}

/// Whether the container is a CRI pod sandbox (the pause container): its task is the VM
/// itself and nothing runs in the guest for it.
pub fn is_pod_sandbox(annotations: &HashMap<String, String>) -> bool {
    annotations
        .get(ANNOTATION_CONTAINER_TYPE)
        .is_some_and(|t| t == "sandbox")
}

/// Extracts `ConfigPath` from containerd's runtime options (`runtimeoptions.v1.Options`:
/// field 1 `type_url`, field 2 `config_path`, field 3 `config_body`). Runc-style options
/// carry no config path.
pub fn config_path_from_options(type_url: &str, value: &[u8]) -> Option<String> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(value);
    let mut config_path = None;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == 2 && wire_type == 2 {
            config_path = input.read_string().ok();
        } else {
            if containerd_shim::protos::protobuf::rt::skip_field_for_tag(tag, &mut input).is_err() {
                return config_path;
            }
        }
    }
    config_path.filter(|p| !p.is_empty())
}

/// Converts the OCI process to the agent's plain type.
fn process_spec(process: &oci_spec::runtime::Process) -> ProcessSpec {
    let user = process.user();
    ProcessSpec {
        args: process.args().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        terminal: process.terminal().unwrap_or(false),
        console_size: process
            .console_size()
            .as_ref()
            .map(|b| (b.height() as u32, b.width() as u32)),
    }
}

/// The OCI mounts the guest can honour: kernel filesystems (proc, sysfs, tmpfs, devpts,
/// mqueue…). Bind mounts name host paths the guest can't see and are left out.
fn guest_mounts(spec: &oci_spec::runtime::Spec) -> Vec<AgentMount> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| {
            let fs_type = m.typ().as_deref().unwrap_or("");
            let bind = fs_type == "bind"
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            !bind && !fs_type.is_empty() && !fs_type.starts_with("cgroup")
        })
        .map(|m| AgentMount {
            destination: m.destination().display().to_string(),
            fs_type: m.typ().clone().unwrap_or_default(),
            source: m
                .source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            options: m.options().clone().unwrap_or_default(),
        })
        .collect()
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// Checks that a configured file exists, so a typo names the setting rather than
/// surfacing later as a VMM error or an agent timeout.
fn require_file(what: &str, setting: &str, path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::VmConfig(format!(
            "the {what} {} does not exist (set {setting} in the shim config)",
            path.display()
        )))
    }
}

/// A process's recorded exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    status: u32,
    at: SystemTime,
}

/// One process (a container's init or an exec).
#[derive(Debug)]
struct Process {
    state: TaskState,
    pid: u32,
    stdio: StdioPaths,
    copy: Option<StdioCopy>,
    exit_tx: Arc<watch::Sender<Option<Exit>>>,
}

impl Process {
    fn new(stdio: StdioPaths) -> Process {
        Process {
            state: TaskState::Created,
            pid: 0,
            stdio,
            copy: None,
            exit_tx: Arc::new(watch::channel(None).0),
        }
    }

    fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }
}

/// One container: its init process, its execs, its bundle and rootfs mount.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// The pod sandbox task: it *is* the VM.
    is_pod_sandbox: bool,
    init: Process,
    execs: HashMap<String, Process>,
    rootfs_mount: Option<PathBuf>,
}

/// Resets `devices` after their VM (off the async threads: sysfs resets block);
/// true when every reset succeeded.
async fn reset_devices(host: HostPaths, devices: Vec<gpuvm_pci::PciAddress>) -> bool {
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

/// The VM and the agent in it.
#[derive(Debug)]
struct Sandbox {
    id: String,
    bundle: PathBuf,
    hypervisor: Box<dyn Hypervisor>,
    agent: Arc<dyn Agent>,
    shared_host: PathBuf,
    shared_guest: String,
    shutdown_timeout: Duration,
    /// Host paths for the device reset after the VM.
    host: HostPaths,
    /// The VFIO devices passed to the VM, if any.
    passthrough: Option<Passthrough>,
    /// Their locks, held for the VM's whole life.
    device_lock: std::sync::Mutex<Option<GroupLock>>,
    /// Where the start time went; `container_ms` is filled by the first app container.
    timings: std::sync::Mutex<StartClock>,
}

/// The start timings and whether the first app container has started.
#[derive(Debug, Default)]
struct StartClock {
    timings: StartTimings,
    first_container_started: bool,
}

impl Sandbox {
    fn clock(&self) -> std::sync::MutexGuard<'_, StartClock> {
        match self.timings.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn timings(&self) -> StartTimings {
        self.clock().timings
    }

    /// Counts `from..now` towards the first app container's start; `started` ends
    /// the count. Returns the complete timings when this call ended it.
    fn count_container_time(&self, from: Instant, started: bool) -> Option<StartTimings> {
        let mut clock = self.clock();
        if clock.first_container_started {
            return None;
        }
        clock.timings.container_ms += StartTimings::millis(from, Instant::now());
        clock.first_container_started = started;
        started.then_some(clock.timings)
    }
}

/// The shim's Task service.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Option<RemotePublisher>,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Held for a whole teardown: a Delete or Shutdown that arrives while the pod
    /// sandbox's Kill is stopping the VM waits for it, so the shim cannot exit under
    /// that Kill (containerd would see "ttrpc: closed").
    teardown_lock: Mutex<()>,
    /// Locks of devices whose reset failed after the VM: kept until the shim exits, so
    /// no other sandbox takes them meanwhile (the health record keeps them out after).
    failed_reset_locks: std::sync::Mutex<Vec<GroupLock>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A Task service publishing events through `publisher`.
    pub fn new(
        namespace: &str,
        exit: Arc<ExitSignal>,
        publisher: Option<RemotePublisher>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                exit,
                publisher,
                sandbox: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                teardown_lock: Mutex::new(()),
                failed_reset_locks: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(publisher) = &self.inner.publisher else {
            return;
        };
        if let Err(e) = publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "cannot publish event");
        }
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .await
            .clone()
            .ok_or_else(|| Error::NotFound("sandbox VM".into()))
    }

    /// Boots the VM for `sandbox_id` and connects to its agent.
    async fn boot_sandbox(
        &self,
        sandbox_id: &str,
        bundle: &Path,
        annotations: &HashMap<String, String>,
        config_option: Option<String>,
    ) -> Result<Arc<Sandbox>> {
        let entered = Instant::now();
        let env = std::env::var(config::CONFIG_ENV).ok();
        let (path, explicit) = config::config_path(config_option.as_deref(), env.as_deref());
        let config = ShimConfig::load(&path, explicit)?;
        require_file("guest kernel", "guest.kernel", &config.guest.kernel)?;
        require_file(
            "guest initramfs",
            "guest.initramfs",
            &config.guest.initramfs,
        )?;
        let size = config::guest_size(&config.guest, annotations)?;
        let devices = match annotations.get(config::ANNOTATION_DEVICES) {
            Some(v) => config::parse_devices(v)?,
            None => Vec::new(),
        };
        // Devices: checked, locked and (after an earlier failed reset) reset again
        // before anything starts.
        let sysfs = Sysfs::new(&config.host.sysfs_root);
        let passthrough = if devices.is_empty() {
            None
        } else {
            Some(crate::devices::check_devices(
                &sysfs,
                &config.host.dev_root,
                &devices,
            )?)
        };
        let device_lock = match &passthrough {
            Some(set) => {
                let lock =
                    crate::devices::lock_devices(&config.host.lock_dir, &set.devices, sandbox_id)?;
                crate::devices::retry_failed_resets(&sysfs, &config.host.health_dir, &set.devices)?;
                tracing::info!(sandbox = sandbox_id, devices = ?set.device_names(), "devices checked and locked");
                Some(lock)
            }
            None => None,
        };
        let hugepage_size = config.memory.hugepage_size_bytes()?;
        let work_dir = PathBuf::from(RUN_DIR).join(sandbox_id);
        let shared_host = work_dir.join("shared");
        let spec = VmSpec {
            id: sandbox_id.to_owned(),
            work_dir: work_dir.clone(),
            kernel: config.guest.kernel.clone(),
            initramfs: config.guest.initramfs.clone(),
            // The agent mounts the virtio-fs share with this tag.
            cmdline: hypervisor::kernel_cmdline(&format!(
                "gpuvm.share={} {}",
                hypervisor::SHARED_FS_TAG,
                config.guest.kernel_params
            )),
            size,
            shared_dir: Some(shared_host.clone()),
            devices: passthrough
                .as_ref()
                .map(Passthrough::device_names)
                .unwrap_or_default(),
            taps: Vec::new(),
            mmio64_size: passthrough
                .as_ref()
                .and_then(|set| crate::devices::mmio64_window(&set.bar64_sizes)),
            memory: hypervisor::MemoryOptions {
                prefault: config.memory.prefault,
                hugepages: config.memory.hugepages,
                hugepage_size,
            },
        };
        let hv = hypervisor::new_hypervisor(&config, spec);
        let mut record = SandboxRecord {
            sandbox_id: sandbox_id.to_owned(),
            vm: hv.record(),
            mounts: vec![shared_host.clone()],
            timings: StartTimings::default(),
        };
        record.save(bundle)?;
        // Rootfs mounts made under the share later must reach virtiofsd's namespace.
        if let Err(e) = crate::rootfs::make_shared_mount(&shared_host) {
            crate::rootfs::unmount(&shared_host);
            SandboxRecord::remove(bundle);
            return Err(e);
        }
        let vmm_starting = Instant::now();
        let persist = |vm: &hypervisor::VmRecord| {
            let record = SandboxRecord {
                vm: vm.clone(),
                ..record.clone()
            };
            if let Err(e) = record.save(bundle) {
                tracing::warn!(error = %e, "cannot update the state file");
            }
        };
        let started = hv.start(&persist).await;
        let vmm_started = Instant::now();
        record.vm = hv.record();
        record.save(bundle)?;
        let passed: Vec<gpuvm_pci::PciAddress> = passthrough
            .as_ref()
            .map(|set| set.devices.clone())
            .unwrap_or_default();
        let fail = |hv: Box<dyn Hypervisor>, shared: PathBuf| {
            let (host, passed) = (config.host.clone(), passed.clone());
            async move {
                hv.cleanup().await;
                crate::rootfs::unmount(&shared);
                crate::rootfs::remove_dir_if_unmounted(&hv.record().work_dir);
                // The VMM may have opened the devices: reset them before they go back.
                if !passed.is_empty() {
                    reset_devices(host, passed).await;
                }
            }
        };
        if let Err(e) = started {
            fail(hv, shared_host).await;
            SandboxRecord::remove(bundle);
            return Err(e);
        }

        let timeout = Duration::from_secs(config.timeouts.agent_connect_secs);
        let vsock_socket = hv.vsock_socket();
        let connected = tokio::select! {
            stream = crate::vsock::connect(&vsock_socket, config.guest.agent_port, timeout) => stream,
            exit = hv.wait_exit() => Err(Error::Hypervisor(format!(
                "the VM exited with code {} before its agent answered", exit.vmm_exit_code
            ))),
        };
        let agent: Arc<dyn Agent> = match connected {
            Ok(stream) => Arc::new(TtrpcAgent::new(stream, timeout)),
            Err(Error::Timeout { what, secs }) => {
                fail(hv, shared_host).await;
                SandboxRecord::remove(bundle);
                // Say which setting to look at: the agent must be the initramfs's /init
                // and listen on guest.agent_port; timeouts.agent_connect_secs bounds it.
                return Err(Error::Timeout {
                    what: format!(
                        "the guest agent to answer on {what} \
                         (is the agent /init of the initramfs? see timeouts.agent_connect_secs)"
                    ),
                    secs,
                });
            }
            Err(e) => {
                fail(hv, shared_host).await;
                SandboxRecord::remove(bundle);
                return Err(e);
            }
        };
        let connected = Instant::now();
        let info = match agent.guest_info().await {
            Ok(info) => info,
            Err(e) => {
                fail(hv, shared_host).await;
                SandboxRecord::remove(bundle);
                return Err(e);
            }
        };
        let ready = Instant::now();
        tracing::info!(sandbox = sandbox_id, kernel = %info.kernel_release, agent = %info.agent_version, "guest agent ready");
        if let Some(set) = &passthrough {
            self.check_guest_gpus(&config.host, set, agent.as_ref(), annotations)
                .await;
        }
        let shared_guest = if info.shared_dir.is_empty() {
            DEFAULT_GUEST_SHARED_DIR.to_owned()
        } else {
            info.shared_dir
        };
        let sandbox = Arc::new(Sandbox {
            id: sandbox_id.to_owned(),
            bundle: bundle.to_owned(),
            hypervisor: hv,
            agent,
            shared_host,
            shared_guest,
            shutdown_timeout: Duration::from_secs(config.timeouts.vm_shutdown_secs),
            host: config.host.clone(),
            passthrough,
            device_lock: std::sync::Mutex::new(device_lock),
            timings: std::sync::Mutex::new(StartClock {
                timings: StartTimings {
                    // The shim's own work: before the VMM starts and after the agent
                    // is ready.
                    shim_ms: StartTimings::millis(entered, vmm_starting)
                        + StartTimings::millis(ready, Instant::now()),
                    vmm_ms: StartTimings::millis(vmm_starting, vmm_started),
                    boot_ms: StartTimings::millis(vmm_started, connected),
                    agent_ms: StartTimings::millis(connected, ready),
                    container_ms: 0,
                },
                first_container_started: false,
            }),
        });
        self.watch_vm(sandbox.clone());
        Ok(sandbox)
    }

    /// Asks the agent which GPUs the guest sees, compares them with what was passed,
    /// and records the outcome for the node agent (`<gpu_check_dir>/<ns>_<name>`).
    /// Never fails the sandbox: the operator reports a failure as `GPUReady=False`.
    async fn check_guest_gpus(
        &self,
        host: &HostPaths,
        set: &Passthrough,
        agent: &dyn Agent,
        annotations: &HashMap<String, String>,
    ) {
        use crate::gpu_check;
        let ids: Vec<u16> = set.gpus.iter().map(|g| g.device_id).collect();
        let expected = gpu_check::expected_models(
            annotations
                .get(config::ANNOTATION_GPU_MODELS)
                .map(String::as_str),
            &ids,
        );
        let check = gpu_check::gpu_check(&expected, agent.gpu_info().await);
        match &check {
            gpu_check::GpuCheck::Ok(summary) => tracing::info!(summary, "guest sees its GPUs"),
            gpu_check::GpuCheck::Failed(reason) => tracing::warn!(reason, "guest GPU check failed"),
        }
        let (Some(namespace), Some(name)) = (
            annotations.get(config::ANNOTATION_POD_NAMESPACE),
            annotations.get(config::ANNOTATION_POD_NAME),
        ) else {
            return;
        };
        let Some(path) = gpu_check::record_path(&host.gpu_check_dir, namespace, name) else {
            tracing::warn!(
                namespace,
                name,
                "no GPU check record for a pod with this name"
            );
            return;
        };
        let uid = annotations
            .get(config::ANNOTATION_POD_UID)
            .map(String::as_str);
        if let Err(e) = gpu_check::write_record(&path, &check, uid) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the GPU check record");
        }
    }

    /// When the VM exits (guest power-off, crash, shutdown), every process still
    /// running in it has exited too.
    fn watch_vm(&self, sandbox: Arc<Sandbox>) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = sandbox.hypervisor.wait_exit().await;
            tracing::info!(sandbox = %sandbox.id, code = exit.vmm_exit_code, "VM exited");
            let ids: Vec<(String, String)> = {
                let containers = service.inner.containers.lock().await;
                containers
                    .iter()
                    .flat_map(|(cid, c)| {
                        std::iter::once((cid.clone(), String::new()))
                            .chain(c.execs.keys().map(|e| (cid.clone(), e.clone())))
                    })
                    .collect()
            };
            for (cid, exec_id) in ids {
                service.record_exit(&cid, &exec_id, 255).await;
            }
        });
    }

    /// Records a process's exit once, and publishes TaskExit.
    async fn record_exit(&self, container_id: &str, exec_id: &str, status: u32) {
        self.record_exit_at(container_id, exec_id, status, SystemTime::now())
            .await;
    }

    async fn record_exit_at(&self, container_id: &str, exec_id: &str, status: u32, at: SystemTime) {
        let pid = {
            let mut containers = self.inner.containers.lock().await;
            let Some(c) = containers.get_mut(container_id) else {
                return;
            };
            let process = if exec_id.is_empty() {
                &mut c.init
            } else {
                match c.execs.get_mut(exec_id) {
                    Some(p) => p,
                    None => return,
                }
            };
            if process.exit().is_some() {
                return;
            }
            match process.state.apply(container_id, TaskAction::Exit) {
                Ok(next) => process.state = next,
                Err(_) => return,
            }
            process.exit_tx.send_replace(Some(Exit { status, at }));
            process.pid
        };
        tracing::info!(
            container = container_id,
            exec = exec_id,
            status,
            "process exited"
        );
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container_id.to_owned(),
                id: if exec_id.is_empty() {
                    container_id.to_owned()
                } else {
                    exec_id.to_owned()
                },
                pid,
                exit_status: status,
                exited_at: Some(timestamp(at)).into(),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Stops the VM: agent shutdown, then VM shutdown, then cleanup. Idempotent.
    async fn teardown(&self) {
        let _teardown = self.inner.teardown_lock.lock().await;
        let sandbox = self.inner.sandbox.lock().await.take();
        let Some(sandbox) = sandbox else {
            return;
        };
        let _ = tokio::time::timeout(sandbox.shutdown_timeout, sandbox.agent.shutdown()).await;
        if let Err(e) = sandbox.hypervisor.shutdown().await {
            tracing::warn!(error = %e, "VM shutdown failed");
        }
        // Unmount before the work dir is removed: removing through a rootfs mount
        // would delete the container's image data.
        let mounts: Vec<PathBuf> = {
            let mut containers = self.inner.containers.lock().await;
            containers
                .values_mut()
                .filter_map(|c| c.rootfs_mount.take())
                .collect()
        };
        for m in mounts {
            crate::rootfs::unmount(&m);
        }
        crate::rootfs::unmount(&sandbox.shared_host);
        sandbox.hypervisor.cleanup().await;
        // The VMM has exited: reset every device, then release its lock. A device
        // that fails its reset got a health record; its lock stays held until the
        // shim exits.
        if let Some(set) = &sandbox.passthrough {
            let lock = match sandbox.device_lock.lock() {
                Ok(mut guard) => guard.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            let all_reset = reset_devices(sandbox.host.clone(), set.devices.clone()).await;
            if let (false, Some(lock)) = (all_reset, lock) {
                match self.inner.failed_reset_locks.lock() {
                    Ok(mut held) => held.push(lock),
                    Err(poisoned) => poisoned.into_inner().push(lock),
                }
            }
        }
        SandboxRecord::remove(&sandbox.bundle);
        tracing::info!(sandbox = %sandbox.id, "sandbox torn down");
    }

    async fn save_record(&self, sandbox: &Sandbox) {
        let mut mounts: Vec<PathBuf> = {
            let containers = self.inner.containers.lock().await;
            containers
                .values()
                .filter_map(|c| c.rootfs_mount.clone())
                .collect()
        };
        mounts.push(sandbox.shared_host.clone());
        let record = SandboxRecord {
            sandbox_id: sandbox.id.clone(),
            vm: sandbox.hypervisor.record(),
            mounts,
            timings: sandbox.timings(),
        };
        if let Err(e) = record.save(&sandbox.bundle) {
            tracing::warn!(error = %e, "cannot update the state file");
        }
    }

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let spec = containerd_shim::asynchronous::util::read_spec(&bundle).await?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let sandbox_id = sandbox_id_of(&req.id, &annotations);
        let pod_sandbox = is_pod_sandbox(&annotations);
        if self.inner.containers.lock().await.contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!("task {}", req.id)));
        }

        let existing = self.inner.sandbox.lock().await.clone();
        let sandbox = match existing {
            Some(s) if s.id == sandbox_id => s,
            Some(s) => {
                return Err(Error::InvalidArgument(format!(
                    "task {} belongs to sandbox {sandbox_id}, but this shim runs sandbox {}",
                    req.id, s.id
                )));
            }
            None if sandbox_id == req.id => {
                let option = req
                    .options
                    .as_ref()
                    .and_then(|any| config_path_from_options(&any.type_url, &any.value));
                let s = self
                    .boot_sandbox(&sandbox_id, &bundle, &annotations, option)
                    .await?;
                *self.inner.sandbox.lock().await = Some(s.clone());
                s
            }
            None => {
                return Err(Error::NotFound(format!(
                    "sandbox {sandbox_id} for task {} (create the sandbox first)",
                    req.id
                )));
            }
        };

        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut container = Container {
            bundle: bundle.clone(),
            is_pod_sandbox: pod_sandbox,
            init: Process::new(stdio),
            execs: HashMap::new(),
            rootfs_mount: None,
        };
        if pod_sandbox {
            container.init.pid = sandbox.hypervisor.pid().unwrap_or(0);
        } else {
            let process = spec
                .process()
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("the OCI spec has no process".into()))?;
            let target = sandbox.shared_host.join(&req.id).join("rootfs");
            let root_path = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            crate::rootfs::mount(&req.rootfs, &bundle, &root_path, &target)?;
            container.rootfs_mount = Some(target);
            let mut process = process_spec(process);
            process.terminal = req.terminal || process.terminal;
            let container_spec = ContainerSpec {
                container_id: req.id.clone(),
                rootfs: format!("{}/{}/rootfs", sandbox.shared_guest, req.id),
                process,
                mounts: guest_mounts(&spec),
                readonly_rootfs: spec
                    .root()
                    .as_ref()
                    .and_then(|r| r.readonly())
                    .unwrap_or(false),
            };
            let creating = Instant::now();
            if let Err(e) = sandbox.agent.create_container(&container_spec).await {
                if let Some(m) = container.rootfs_mount.take() {
                    crate::rootfs::unmount(&m);
                }
                return Err(e);
            }
            sandbox.count_container_time(creating, false);
            // The host-visible pid of every task is the VMM's: guest pids mean nothing
            // on the host, and containerd reads /proc/<pid> of the tasks it tracks.
            container.init.pid = sandbox.hypervisor.pid().unwrap_or(0);
        }
        let pid = container.init.pid;
        self.inner
            .containers
            .lock()
            .await
            .insert(req.id.clone(), container);
        self.save_record(&sandbox).await;
        tracing::info!(task = %req.id, sandbox = %sandbox_id, pod_sandbox, "task created");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Applies `action` to a process and returns (next state, pid, is pod sandbox).
    async fn check(
        &self,
        id: &str,
        exec_id: &str,
        action: TaskAction,
    ) -> Result<(TaskState, u32, bool)> {
        let containers = self.inner.containers.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in task {id}")))?
        };
        let label = if exec_id.is_empty() {
            id.to_owned()
        } else {
            format!("{id}/{exec_id}")
        };
        Ok((p.state.apply(&label, action)?, p.pid, c.is_pod_sandbox))
    }

    async fn set_state(&self, id: &str, exec_id: &str, state: TaskState, pid: Option<u32>) {
        let mut containers = self.inner.containers.lock().await;
        if let Some(c) = containers.get_mut(id) {
            let p = if exec_id.is_empty() {
                Some(&mut c.init)
            } else {
                c.execs.get_mut(exec_id)
            };
            if let Some(p) = p {
                // An exit recorded meanwhile wins over Running.
                if p.exit().is_none() {
                    p.state = state;
                }
                if let Some(pid) = pid {
                    p.pid = pid;
                }
            }
        }
    }

    async fn do_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (next, vmm_pid, pod_sandbox) = self.check(id, exec_id, TaskAction::Start).await?;
        if pod_sandbox && exec_id.is_empty() {
            self.set_state(id, exec_id, next, None).await;
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: id.to_owned(),
                    pid: vmm_pid,
                    ..Default::default()
                }),
            )
            .await;
            return Ok(vmm_pid);
        }
        let sandbox = self.sandbox().await?;
        let pid_id = ProcessId {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        let stdio = {
            let containers = self.inner.containers.lock().await;
            containers
                .get(id)
                .and_then(|c| {
                    if exec_id.is_empty() {
                        Some(&c.init)
                    } else {
                        c.execs.get(exec_id)
                    }
                })
                .map(|p| p.stdio.clone())
                .unwrap_or_default()
        };
        let starting = Instant::now();
        let _guest_pid = sandbox.agent.start_process(&pid_id).await.inspect_err(|e| {
            tracing::warn!(task = id, exec = exec_id, error = %e, "guest could not start the process");
        })?;
        let first_start = if exec_id.is_empty() {
            sandbox.count_container_time(starting, true)
        } else {
            None
        };
        // Execs report the VMM pid too, for the same reason as containers.
        let pid = if exec_id.is_empty() {
            vmm_pid
        } else {
            sandbox.hypervisor.pid().unwrap_or(0)
        };
        let copy = StdioCopy::start(sandbox.agent.clone(), pid_id.clone(), &stdio);
        {
            let mut containers = self.inner.containers.lock().await;
            if let Some(c) = containers.get_mut(id) {
                let p = if exec_id.is_empty() {
                    Some(&mut c.init)
                } else {
                    c.execs.get_mut(exec_id)
                };
                if let Some(p) = p {
                    p.copy = Some(copy);
                }
            }
        }
        self.set_state(id, exec_id, next, Some(pid)).await;
        tracing::info!(task = id, exec = exec_id, "process started");
        if let Some(t) = first_start {
            tracing::info!(
                sandbox = %sandbox.id,
                shim_ms = t.shim_ms,
                vmm_ms = t.vmm_ms,
                boot_ms = t.boot_ms,
                agent_ms = t.agent_ms,
                container_ms = t.container_ms,
                "sandbox start timings"
            );
            self.save_record(&sandbox).await;
        }
        if exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        self.spawn_waiter(sandbox, pid_id);
        Ok(pid)
    }

    /// Waits in the guest for the process's exit, lets its output drain, then records it.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, id: ProcessId) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = sandbox.agent.wait_process(&id).await;
            let copy = {
                let mut containers = service.inner.containers.lock().await;
                containers.get_mut(&id.container_id).and_then(|c| {
                    let p = if id.exec_id.is_empty() {
                        Some(&mut c.init)
                    } else {
                        c.execs.get_mut(&id.exec_id)
                    };
                    p.and_then(|p| p.copy.take())
                })
            };
            if let Some(mut copy) = copy {
                copy.wait_outputs().await;
            }
            match exit {
                Ok(exit) => {
                    if exit.oom_killed {
                        // As runc's shim does: the OOM event comes before the exit, so
                        // CRI reports the container's reason as OOMKilled.
                        tracing::info!(task = %id.container_id, exec = %id.exec_id, "OOM-killed in the guest");
                        service
                            .publish(
                                topics::TASK_OOM_EVENT_TOPIC,
                                Box::new(TaskOOM {
                                    container_id: id.container_id.clone(),
                                    ..Default::default()
                                }),
                            )
                            .await;
                    }
                    service
                        .record_exit_at(&id.container_id, &id.exec_id, exit.status, exit.exited_at)
                        .await
                }
                Err(e) => {
                    tracing::warn!(task = %id.container_id, exec = %id.exec_id, error = %e, "waiting for the process failed");
                    service
                        .record_exit(&id.container_id, &id.exec_id, 255)
                        .await;
                }
            }
        });
    }

    async fn exit_receiver(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<watch::Receiver<Option<Exit>>> {
        let containers = self.inner.containers.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in task {id}")))?
        };
        Ok(p.exit_tx.subscribe())
    }

    async fn do_wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let mut rx = self.exit_receiver(id, exec_id).await?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::NotFound(format!("task {id} was deleted while waiting")))?;
        exit.ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    async fn do_kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let (_, _, pod_sandbox) = self.check(id, exec_id, TaskAction::Kill).await?;
        if pod_sandbox && exec_id.is_empty() {
            // The pod sandbox task is the VM: stopping it stops the VM. Its exit is
            // the signal's, recorded first so the VM-exit watcher's 255 doesn't win.
            tracing::info!(task = id, signal, "stopping the sandbox VM");
            self.record_exit(id, "", 128 + signal).await;
            self.teardown().await;
            return Ok(());
        }
        let sandbox = self.sandbox().await?;
        let pid = ProcessId {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        let never_started = self
            .with_process(id, exec_id, |p| p.state == TaskState::Created)
            .await?;
        if never_started {
            // Nothing runs in the guest yet, so no exit would ever come from there:
            // a kill of a created process ends it here (runc kills its `runc init`).
            self.record_exit(id, exec_id, 128 + signal).await;
            return Ok(());
        }
        sandbox.agent.signal_process(&pid, signal, all).await
    }

    async fn do_delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let (_, pid, pod_sandbox) = self.check(id, exec_id, TaskAction::Delete).await?;
        let exit = {
            let containers = self.inner.containers.lock().await;
            containers
                .get(id)
                .and_then(|c| {
                    if exec_id.is_empty() {
                        Some(&c.init)
                    } else {
                        c.execs.get(exec_id)
                    }
                })
                .and_then(Process::exit)
                .unwrap_or(Exit {
                    status: 0,
                    at: SystemTime::now(),
                })
        };
        let sandbox = self.inner.sandbox.lock().await.clone();
        let pid_id = ProcessId {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        };
        if let Some(sandbox) = &sandbox
            && !(pod_sandbox && exec_id.is_empty())
        {
            match sandbox.agent.delete_process(&pid_id).await {
                Ok(()) | Err(Error::NotFound(_)) => {}
                // The VM may be gone already; the process is gone with it.
                Err(e) => tracing::debug!(task = id, error = %e, "agent delete failed"),
            }
        }
        if exec_id.is_empty() {
            let removed = self.inner.containers.lock().await.remove(id);
            if let Some(mount) = removed.as_ref().and_then(|c| c.rootfs_mount.clone()) {
                crate::rootfs::unmount(&mount);
                if let Some(parent) = mount.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
            // The task that created the sandbox owns the VM.
            if sandbox.as_ref().is_some_and(|s| s.id == id) {
                self.teardown().await;
            } else if let Some(s) = &sandbox {
                self.save_record(s).await;
            }
            tracing::info!(task = id, "task deleted");
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: id.to_owned(),
                    id: id.to_owned(),
                    pid,
                    exit_status: exit.status,
                    exited_at: Some(timestamp(exit.at)).into(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            let mut containers = self.inner.containers.lock().await;
            if let Some(c) = containers.get_mut(id) {
                c.execs.remove(exec_id);
            }
        }
        Ok((pid, exit))
    }

    async fn do_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        self.check(&req.id, "", TaskAction::Exec).await?;
        let sandbox = self.sandbox().await?;
        let any = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        let process: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        let mut spec = process_spec(&process);
        spec.terminal = req.terminal || spec.terminal;
        {
            let mut containers = self.inner.containers.lock().await;
            let c = containers
                .get_mut(&req.id)
                .ok_or_else(|| Error::NotFound(format!("task {}", req.id)))?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(Error::AlreadyExists(format!(
                    "exec {} in task {}",
                    req.exec_id, req.id
                )));
            }
            c.execs.insert(
                req.exec_id.clone(),
                Process::new(StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                }),
            );
        }
        let pid = ProcessId {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        };
        if let Err(e) = sandbox.agent.exec_process(&pid, &spec).await {
            let mut containers = self.inner.containers.lock().await;
            if let Some(c) = containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Err(e);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    async fn do_state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let containers = self.inner.containers.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in task {id}")))?
        };
        let exit = p.exit();
        Ok(api::StateResponse {
            id: id.to_owned(),
            bundle: c.bundle.display().to_string(),
            pid: p.pid,
            status: p.state.to_status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse> {
        let (_, vmm_pid, pod_sandbox) = self.check(id, "", TaskAction::Io).await?;
        let pids = if pod_sandbox {
            vec![vmm_pid]
        } else {
            self.sandbox().await?.agent.pids(id).await?
        };
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn do_stats(&self, id: &str) -> Result<api::StatsResponse> {
        use containerd_shim::protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
        };
        let (_, _, pod_sandbox) = self.check(id, "", TaskAction::Io).await?;
        let mut metrics = Metrics::new();
        if !pod_sandbox {
            let stats = self
                .sandbox()
                .await?
                .agent
                .process_stats(&ProcessId::init(id))
                .await?;
            metrics.cpu = Some(CPUStat {
                usage: Some(CPUUsage {
                    total: stats.cpu_user_ns + stats.cpu_system_ns,
                    user: stats.cpu_user_ns,
                    kernel: stats.cpu_system_ns,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            })
            .into();
            metrics.memory = Some(MemoryStat {
                usage: Some(MemoryEntry {
                    usage: stats.rss_bytes,
                    ..Default::default()
                })
                .into(),
                rss: stats.rss_bytes,
                ..Default::default()
            })
            .into();
            metrics.pids = Some(PidsStat {
                current: u64::from(stats.processes),
                ..Default::default()
            })
            .into();
        }
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn with_process<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&Process) -> T,
    ) -> Result<T> {
        let containers = self.inner.containers.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = if exec_id.is_empty() {
            &c.init
        } else {
            c.execs
                .get(exec_id)
                .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in task {id}")))?
        };
        Ok(f(p))
    }

    async fn do_shutdown(&self) -> Result<()> {
        if !self.inner.containers.lock().await.is_empty() {
            // containerd sends Shutdown after each delete; the shim lives on while
            // tasks remain.
            return Ok(());
        }
        self.teardown().await;
        tracing::info!("shim shutting down");
        self.inner.exit.signal();
        Ok(())
    }
}

#[async_trait]
impl Task for Service {
    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Ok(self.do_create(req).await?)
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self.do_start(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let exit = self.do_wait(&req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all))]
    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        self.do_kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.do_delete(&req.id, &req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        self.do_exec(req).await?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(&req.id, &req.exec_id).await?)
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        Ok(self.do_pids(&req.id).await?)
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.do_stats(&req.id).await?)
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        self.check(&req.id, &req.exec_id, TaskAction::Io).await?;
        self.with_process(&req.id, &req.exec_id, |p| {
            if let Some(copy) = &p.copy {
                copy.close_stdin();
            }
        })
        .await?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id, exec = %req.exec_id))]
    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        self.check(&req.id, &req.exec_id, TaskAction::Io).await?;
        let sandbox = self.sandbox().await?;
        let pid = ProcessId {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        };
        sandbox
            .agent
            .resize_terminal(&pid, req.height, req.width)
            .await?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.check(&req.id, "", TaskAction::Pause).await?;
        Err(
            Error::Unimplemented("pausing a task: the guest agent cannot freeze processes".into())
                .into(),
        )
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.check(&req.id, "", TaskAction::Resume).await?;
        Err(
            Error::Unimplemented("resuming a task: the guest agent cannot freeze processes".into())
                .into(),
        )
    }

    #[instrument(level = "debug", skip_all, fields(id = %req.id))]
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        tracing::debug!(id = %req.id, "connect");
        let task_pid = match self.inner.sandbox.lock().await.as_ref() {
            Some(s) => s.hypervisor.pid().unwrap_or(0),
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    #[instrument(level = "debug", skip_all)]
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        self.do_shutdown().await?;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grouping_by_sandbox_annotation() {
        assert_eq!(sandbox_id_of("c1", &annotations(&[])), "c1");
        assert_eq!(
            sandbox_id_of("c1", &annotations(&[(ANNOTATION_SANDBOX_ID, "pod1")])),
            "pod1"
        );
        assert_eq!(
            sandbox_id_of("c1", &annotations(&[(ANNOTATION_SANDBOX_ID, "")])),
            "c1"
        );
        assert!(is_pod_sandbox(&annotations(&[(
            ANNOTATION_CONTAINER_TYPE,
            "sandbox"
        )])));
        assert!(!is_pod_sandbox(&annotations(&[(
            ANNOTATION_CONTAINER_TYPE,
            "container"
        )])));
        assert!(!is_pod_sandbox(&annotations(&[])));
    }

    #[test]
    fn config_path_from_runtime_options() {
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/gpuvm/a.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 17];
        value.extend_from_slice(b"/etc/gpuvm/a.toml");
        assert_eq!(
            config_path_from_options("type.googleapis.com/runtimeoptions.v1.Options", &value),
            Some("/etc/gpuvm/a.toml".to_string())
        );
        assert_eq!(
            config_path_from_options("type.googleapis.com/containerd.runc.v1.Options", &value),
            None
        );
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &[]),
            None
        );
        assert_eq!(
            config_path_from_options("runtimeoptions.v1.Options", &[0x12, 50]),
            None
        );
    }

    #[test]
    fn only_kernel_filesystems_reach_the_guest() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
                {"destination": "/etc/resolv.conf", "source": "/var/lib/x/resolv.conf", "options": ["bind", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ]
        }))
        .expect("spec");
        let mounts = guest_mounts(&spec);
        let destinations: Vec<&str> = mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(destinations, vec!["/proc", "/dev"]);
        assert_eq!(mounts[1].options, vec!["nosuid", "mode=755"]);
    }

    #[test]
    fn oci_process_translation() {
        let process: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin"],
            "cwd": "/work",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [10]},
            "terminal": true,
            "consoleSize": {"height": 24, "width": 80}
        }))
        .expect("process");
        let spec = process_spec(&process);
        assert_eq!(spec.args, vec!["sh", "-c", "echo hi"]);
        assert_eq!((spec.uid, spec.gid), (1000, 100));
        assert_eq!(spec.additional_gids, vec![10]);
        assert_eq!(spec.cwd, "/work");
        assert!(spec.terminal);
        assert_eq!(spec.console_size, Some((24, 80)));
    }

    #[tokio::test]
    async fn bad_transitions_answer_failed_precondition() {
        use containerd_shim::protos::ttrpc::Code;
        let service = Service::new("default", Arc::new(ExitSignal::default()), None);
        service.inner.containers.lock().await.insert(
            "c1".into(),
            Container {
                bundle: PathBuf::from("/b"),
                is_pod_sandbox: true,
                init: Process::new(StdioPaths::default()),
                execs: HashMap::new(),
                rootfs_mount: None,
            },
        );
        // Created: pause is a bad transition.
        let err = service
            .check("c1", "", TaskAction::Pause)
            .await
            .expect_err("bad");
        assert_eq!(err.code(), Code::FAILED_PRECONDITION);
        // A pod sandbox starts without a guest process and reports Running.
        service.do_start("c1", "").await.expect("start");
        let state = service.do_state("c1", "").await.expect("state");
        assert_eq!(state.status.enum_value_or_default(), api::Status::RUNNING);
        // Running: delete is a bad transition.
        let err = service.do_delete("c1", "").await.expect_err("bad");
        assert_eq!(err.code(), Code::FAILED_PRECONDITION);
        // Exit, then wait returns it, then delete succeeds and kill says "finished".
        service.record_exit("c1", "", 137).await;
        assert_eq!(service.do_wait("c1", "").await.expect("wait").status, 137);
        let err = service
            .do_kill("c1", "", 9, false)
            .await
            .expect_err("finished");
        assert_eq!(err.code(), Code::NOT_FOUND);
        let (_, exit) = service.do_delete("c1", "").await.expect("delete");
        assert_eq!(exit.status, 137);
        assert_eq!(
            service.do_state("c1", "").await.expect_err("gone").code(),
            Code::NOT_FOUND
        );
        // With no task left, Shutdown signals the shim to exit.
        service.do_shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn killing_the_pod_sandbox_task_reports_the_signal() {
        let service = Service::new("k8s.io", Arc::new(ExitSignal::default()), None);
        service.inner.containers.lock().await.insert(
            "pod".into(),
            Container {
                bundle: PathBuf::from("/b"),
                is_pod_sandbox: true,
                init: Process::new(StdioPaths::default()),
                execs: HashMap::new(),
                rootfs_mount: None,
            },
        );
        service.do_start("pod", "").await.expect("start");
        service.do_kill("pod", "", 9, false).await.expect("kill");
        assert_eq!(service.do_wait("pod", "").await.expect("wait").status, 137);
        // A second exit (the VM watcher's) doesn't overwrite the first.
        service.record_exit("pod", "", 255).await;
        let state = service.do_state("pod", "").await.expect("state");
        assert_eq!(state.exit_status, 137);
        assert_eq!(state.status.enum_value_or_default(), api::Status::STOPPED);
    }
}
