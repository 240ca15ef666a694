//! The seam between the shim and the guest agent: an [`Agent`] trait in plain Rust
//! types, and [`TtrpcAgent`], the single translation layer onto `gpuvm-protocol`'s
//! ttrpc client.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use gpuvm_protocol::agent as pb;
use gpuvm_protocol::agent_ttrpc_async::AgentServiceClient;
use gpuvm_protocol::ttrpc;
use tokio::net::UnixStream;

use crate::error::{Error, Result};

/// Identifies one process: a container's init process (empty `exec_id`) or an exec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// Container id.
    pub container_id: String,
    /// Exec id, empty for the init process.
    pub exec_id: String,
}

impl ProcessId {
    /// The init process of `container_id`.
    pub fn init(container_id: &str) -> ProcessId {
        ProcessId {
            container_id: container_id.to_owned(),
            exec_id: String::new(),
        }
    }
}

/// One process to run (from the OCI spec's `process`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Working directory in the container.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Run on a pseudo-terminal.
    pub terminal: bool,
    /// Initial terminal size (rows, columns).
    pub console_size: Option<(u32, u32)>,
    /// Capability sets. Always sent: empty sets give the process no capabilities
    /// (as runc does for a spec without `process.capabilities`).
    pub capabilities: Capabilities,
    /// Set `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// File-mode creation mask; `None` leaves the agent's default (0022, as runc).
    pub umask: Option<u32>,
    /// Resource limits (OCI `process.rlimits`), set before exec.
    pub rlimits: Vec<Rlimit>,
}

/// One resource limit, by OCI name (`RLIMIT_NOFILE`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rlimit {
    /// The OCI name.
    pub resource: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// OCI `linux.resources` of a container, as OCI means them; the agent converts them
/// for its cgroup (see the protocol's `Resources`). `None`: not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit, bytes; -1 unlimited.
    pub memory_limit: Option<i64>,
    /// Memory reservation (soft limit), bytes.
    pub memory_reservation: Option<i64>,
    /// Memory plus swap, bytes; -1 unlimited.
    pub memory_swap: Option<i64>,
    /// CPU shares (relative weight).
    pub cpu_shares: Option<u64>,
    /// CPU time per period, µs; -1 unlimited.
    pub cpu_quota: Option<i64>,
    /// CPU period, µs.
    pub cpu_period: Option<u64>,
    /// Maximum number of tasks; 0 or -1 unlimited.
    pub pids_limit: Option<i64>,
}

/// Linux capability sets by OCI name (`CAP_SYS_ADMIN`), each sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Vec<String>,
    /// Effective set.
    pub effective: Vec<String>,
    /// Permitted set.
    pub permitted: Vec<String>,
    /// Inheritable set.
    pub inheritable: Vec<String>,
    /// Ambient set.
    pub ambient: Vec<String>,
}

/// A seccomp profile, names as OCI spells them (`SCMP_ACT_ERRNO`, `SCMP_CMP_EQ`,
/// `SCMP_ARCH_X86_64`, `SECCOMP_FILTER_FLAG_LOG`); the agent compiles it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seccomp {
    /// Action for syscalls no rule matches.
    pub default_action: String,
    /// errno of a default `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE`; `None` is EPERM.
    pub default_errno_ret: Option<u32>,
    /// Architectures the profile is for; empty means the native one.
    pub architectures: Vec<String>,
    /// Filter flags.
    pub flags: Vec<String>,
    /// Rules, in order.
    pub syscalls: Vec<SeccompSyscall>,
}

/// One seccomp rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeccompSyscall {
    /// Syscall names.
    pub names: Vec<String>,
    /// Action when the rule matches.
    pub action: String,
    /// errno of `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE`; `None` is EPERM.
    pub errno_ret: Option<u32>,
    /// Argument conditions.
    pub args: Vec<SeccompArg>,
}

/// One argument condition of a seccomp rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeccompArg {
    /// Argument index.
    pub index: u32,
    /// Compared value (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The compared value of `SCMP_CMP_MASKED_EQ`.
    pub value_two: u64,
    /// Comparison.
    pub op: String,
}

/// A namespace the container gets for itself (`pid`, `ipc` or `uts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace type.
    pub ns_type: String,
    /// Guest path of a namespace to join; empty for a new one.
    pub path: String,
}

/// A mount inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Path in the container.
    pub destination: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Source.
    pub source: String,
    /// Options.
    pub options: Vec<String>,
}

/// A container with its init process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container id.
    pub container_id: String,
    /// Guest path of the root filesystem.
    pub rootfs: String,
    /// Init process.
    pub process: ProcessSpec,
    /// Mounts, in order.
    pub mounts: Vec<Mount>,
    /// Read-only root filesystem.
    pub readonly_rootfs: bool,
    /// Seccomp profile for every process of the container.
    pub seccomp: Option<Seccomp>,
    /// Namespaces of its own; a type not listed is shared with the pod.
    pub namespaces: Vec<Namespace>,
    /// Limits of its cgroup in the guest.
    pub resources: Option<Resources>,
    /// Its OCI annotations (containerd adds the Pod's `gpuvm.dev/*` ones through
    /// `pod_annotations`): the agent reads the container name and type and
    /// `gpuvm.dev/no-gpu-containers` from them.
    pub annotations: HashMap<String, String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Guest pid.
    pub pid: u32,
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When it exited.
    pub exited_at: SystemTime,
    /// The guest kernel's OOM killer ended it (or a process of its container).
    pub oom_killed: bool,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// stdout (with a terminal: all output).
    Stdout,
    /// stderr.
    Stderr,
}

/// CPU and memory of one process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// User CPU time.
    pub cpu_user_ns: u64,
    /// System CPU time.
    pub cpu_system_ns: u64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Number of processes.
    pub processes: u32,
}

/// Facts about the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// Agent version.
    pub agent_version: String,
    /// Where the virtio-fs share is mounted in the guest, empty if none.
    pub shared_dir: String,
}

/// One GPU seen by the guest driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInfo {
    /// Model name.
    pub name: String,
    /// GPU UUID.
    pub uuid: String,
    /// PCI bus id in the guest.
    pub pci_bus_id: String,
}

/// One NVIDIA Xid the guest kernel logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XidEvent {
    /// The PCI address as the driver printed it (`0000:01:00`).
    pub pci_bus_id: String,
    /// The Xid code.
    pub code: u32,
    /// The rest of the log line.
    pub message: String,
    /// Guest `CLOCK_BOOTTIME` of the record, in microseconds.
    pub uptime_us: u64,
}

/// The agent's `GpuInfo` answer: the state of the guest's NVIDIA driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReport {
    /// Driver version (`550.163.01`).
    pub driver_version: String,
    /// CUDA driver version as NVML reports it (`12040` for 12.4).
    pub cuda_driver_version: i32,
    /// The GPUs NVML sees.
    pub gpus: Vec<GpuInfo>,
    /// Xids logged since boot, oldest first (the agent keeps the last 64).
    pub xid_events: Vec<XidEvent>,
    /// NVIDIA modules loaded, in load order.
    pub modules: Vec<String>,
    /// Why the driver is not usable; empty when it is.
    pub driver_error: String,
    /// Device nodes the agent created.
    pub device_nodes: Vec<String>,
}

/// One guest NIC for `ConfigureNetwork`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInterface {
    /// The MAC the VMM gave the NIC (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The pod's name for it.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Addresses with their prefix length.
    pub addresses: Vec<(std::net::IpAddr, u8)>,
}

/// One route for `ConfigureNetwork` (addresses as text, empty for none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestRoute {
    /// CIDR; empty for the default route.
    pub destination: String,
    /// Next hop.
    pub gateway: String,
    /// Interface name.
    pub device: String,
    /// Preferred source.
    pub source: String,
    /// Priority.
    pub metric: u32,
}

/// The pod network and hostname the guest gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetwork {
    /// NICs.
    pub interfaces: Vec<GuestInterface>,
    /// Routes, in order.
    pub routes: Vec<GuestRoute>,
    /// Hostname; empty keeps the guest's.
    pub hostname: String,
}

/// What the shim needs from the guest agent.
#[async_trait]
pub trait Agent: Send + Sync + std::fmt::Debug {
    /// Liveness; returns the agent version.
    async fn ping(&self) -> Result<String>;
    /// Facts about the guest.
    async fn guest_info(&self) -> Result<GuestInfo>;
    /// The guest driver's state and the GPUs it sees.
    async fn gpu_info(&self) -> Result<GpuReport>;
    /// Registers a container and its init process (not started).
    async fn create_container(&self, spec: &ContainerSpec) -> Result<()>;
    /// Registers an exec process (not started).
    async fn exec_process(&self, id: &ProcessId, spec: &ProcessSpec) -> Result<()>;
    /// Starts a registered process; returns its guest pid.
    async fn start_process(&self, id: &ProcessId) -> Result<u32>;
    /// Sends `signal` to the process, or to every process of the container with `all`.
    async fn signal_process(&self, id: &ProcessId, signal: u32, all: bool) -> Result<()>;
    /// Waits for the process to exit.
    async fn wait_process(&self, id: &ProcessId) -> Result<ExitInfo>;
    /// Forgets an exited process.
    async fn delete_process(&self, id: &ProcessId) -> Result<()>;
    /// Reads output; `None` at end of stream.
    async fn read_output(&self, id: &ProcessId, stream: OutputStream) -> Result<Option<Vec<u8>>>;
    /// Writes to stdin; returns the bytes written.
    async fn write_stdin(&self, id: &ProcessId, data: &[u8]) -> Result<usize>;
    /// Closes stdin.
    async fn close_stdin(&self, id: &ProcessId) -> Result<()>;
    /// Resizes the process's terminal.
    async fn resize_terminal(&self, id: &ProcessId, rows: u32, columns: u32) -> Result<()>;
    /// Guest pids of a container's processes.
    async fn pids(&self, container_id: &str) -> Result<Vec<u32>>;
    /// CPU and memory of a process tree.
    async fn process_stats(&self, id: &ProcessId) -> Result<ProcessStats>;
    /// Kills everything and powers the guest off.
    async fn shutdown(&self) -> Result<()>;
    /// Configures the guest's NICs, routes and hostname.
    async fn configure_network(&self, network: &GuestNetwork) -> Result<()>;
}

/// [`Agent`] over ttrpc on a hybrid-vsock stream.
#[derive(Clone)]
pub struct TtrpcAgent {
    client: AgentServiceClient,
    timeout: Duration,
}

impl std::fmt::Debug for TtrpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtrpcAgent")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Maps a ttrpc error from the agent onto the shim's error (the only place that does).
fn agent_error(call: &str, err: ttrpc::Error) -> Error {
    match err {
        ttrpc::Error::RpcStatus(status) => {
            let message = format!("{call}: {}", status.message);
            match status.code() {
                ttrpc::Code::NOT_FOUND => Error::NotFound(message),
                ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(message),
                ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(message),
                ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(message),
                ttrpc::Code::UNAVAILABLE => Error::AgentUnavailable(message),
                ttrpc::Code::FAILED_PRECONDITION => Error::GuestPrecondition(message),
                _ => Error::Agent(message),
            }
        }
        other => Error::AgentUnavailable(format!("{call}: {other}")),
    }
}

impl From<&ProcessSpec> for pb::ProcessSpec {
    fn from(spec: &ProcessSpec) -> pb::ProcessSpec {
        let mut out = pb::ProcessSpec {
            args: spec.args.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            uid: spec.uid,
            gid: spec.gid,
            additional_gids: spec.additional_gids.clone(),
            terminal: spec.terminal,
            // Always set: an unset field would keep every capability of the agent.
            capabilities: protobuf_some(pb::Capabilities {
                bounding: spec.capabilities.bounding.clone(),
                effective: spec.capabilities.effective.clone(),
                permitted: spec.capabilities.permitted.clone(),
                inheritable: spec.capabilities.inheritable.clone(),
                ambient: spec.capabilities.ambient.clone(),
                ..Default::default()
            }),
            no_new_privileges: spec.no_new_privileges,
            umask: spec.umask,
            rlimits: spec
                .rlimits
                .iter()
                .map(|r| pb::Rlimit {
                    type_: r.resource.clone(),
                    soft: r.soft,
                    hard: r.hard,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        if let Some((rows, columns)) = spec.console_size {
            out.console_size = protobuf_some(pb::ConsoleSize {
                rows,
                columns,
                ..Default::default()
            });
        }
        out
    }
}

impl From<&Seccomp> for pb::Seccomp {
    fn from(profile: &Seccomp) -> pb::Seccomp {
        pb::Seccomp {
            default_action: profile.default_action.clone(),
            default_errno_ret: profile.default_errno_ret,
            architectures: profile.architectures.clone(),
            flags: profile.flags.clone(),
            syscalls: profile
                .syscalls
                .iter()
                .map(|rule| pb::SeccompSyscall {
                    names: rule.names.clone(),
                    action: rule.action.clone(),
                    errno_ret: rule.errno_ret,
                    args: rule
                        .args
                        .iter()
                        .map(|arg| pb::SeccompArg {
                            index: arg.index,
                            value: arg.value,
                            value_two: arg.value_two,
                            op: arg.op.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// The agent's request for a container with its init process.
fn create_request(spec: &ContainerSpec) -> pb::CreateProcessRequest {
    let mut req = pb::CreateProcessRequest {
        container_id: spec.container_id.clone(),
        rootfs: spec.rootfs.clone(),
        process: protobuf_some(pb::ProcessSpec::from(&spec.process)),
        mounts: spec
            .mounts
            .iter()
            .map(|m| pb::Mount {
                destination: m.destination.clone(),
                type_: m.fs_type.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
                ..Default::default()
            })
            .collect(),
        readonly_rootfs: spec.readonly_rootfs,
        annotations: spec.annotations.clone(),
        namespaces: spec
            .namespaces
            .iter()
            .map(|ns| pb::Namespace {
                type_: ns.ns_type.clone(),
                path: ns.path.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if let Some(profile) = &spec.seccomp {
        req.seccomp = protobuf_some(pb::Seccomp::from(profile));
    }
    if let Some(r) = spec.resources {
        req.resources = protobuf_some(pb::Resources {
            memory_limit: r.memory_limit,
            memory_reservation: r.memory_reservation,
            memory_swap: r.memory_swap,
            cpu_shares: r.cpu_shares,
            cpu_quota: r.cpu_quota,
            cpu_period: r.cpu_period,
            pids_limit: r.pids_limit,
            ..Default::default()
        });
    }
    req
}

fn protobuf_some<T>(value: T) -> gpuvm_protocol::protobuf::MessageField<T> {
    gpuvm_protocol::protobuf::MessageField::some(value)
}

/// Guest exit time (ns since the epoch) as a `SystemTime`; 0 or negative means "now".
fn exit_time(unix_nanos: i64) -> SystemTime {
    match u64::try_from(unix_nanos) {
        Ok(n) if n > 0 => SystemTime::UNIX_EPOCH + Duration::from_nanos(n),
        _ => SystemTime::now(),
    }
}

impl TtrpcAgent {
    /// Wraps a connected hybrid-vsock stream. `timeout` bounds every call except
    /// waits and reads, which block by design.
    pub fn new(stream: UnixStream, timeout: Duration) -> TtrpcAgent {
        let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream));
        TtrpcAgent {
            client: AgentServiceClient::new(client),
            timeout,
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        Self::ctx_for(self.timeout)
    }

    fn ctx_for(bound: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(i64::try_from(bound.as_nanos()).unwrap_or(i64::MAX))
    }

    fn no_timeout() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(0)
    }

    /// GpuInfo's bound: the agent waits for the NVIDIA modules to finish loading
    /// (at most 300 s: GSP firmware boot of eight GPUs) and then for its NVML helper
    /// (at most 60 s), so an ordinary call timeout would cut a healthy first answer.
    fn gpu_info_ctx(&self) -> ttrpc::context::Context {
        Self::ctx_for(self.timeout.max(GPU_INFO_TIMEOUT))
    }
}

/// The longest GpuInfo may take: the agent's module wait and helper limit, plus slack.
pub const GPU_INFO_TIMEOUT: Duration = Duration::from_secs(300 + 60 + 30);

#[async_trait]
impl Agent for TtrpcAgent {
    async fn ping(&self) -> Result<String> {
        let r = self
            .client
            .ping(self.ctx(), &pb::PingRequest::default())
            .await
            .map_err(|e| agent_error("Ping", e))?;
        Ok(r.agent_version)
    }

    async fn guest_info(&self) -> Result<GuestInfo> {
        let r = self
            .client
            .guest_info(self.ctx(), &pb::GuestInfoRequest::default())
            .await
            .map_err(|e| agent_error("GuestInfo", e))?;
        Ok(GuestInfo {
            kernel_release: r.kernel_release,
            agent_version: r.agent_version,
            shared_dir: r.shared_dir,
        })
    }

    async fn gpu_info(&self) -> Result<GpuReport> {
        let r = self
            .client
            .gpu_info(self.gpu_info_ctx(), &pb::GpuInfoRequest::default())
            .await
            .map_err(|e| agent_error("GpuInfo", e))?;
        Ok(GpuReport {
            driver_version: r.driver_version,
            cuda_driver_version: r.cuda_driver_version,
            gpus: r
                .gpus
                .into_iter()
                .map(|g| GpuInfo {
                    name: g.name,
                    uuid: g.uuid,
                    pci_bus_id: g.pci_bus_id,
                })
                .collect(),
            xid_events: r
                .xid_events
                .into_iter()
                .map(|x| XidEvent {
                    pci_bus_id: x.pci_bus_id,
                    code: x.code,
                    message: x.message,
                    uptime_us: x.uptime_us,
                })
                .collect(),
            modules: r.modules,
            driver_error: r.driver_error,
            device_nodes: r.device_nodes,
        })
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<()> {
        let req = create_request(spec);
        self.client
            .create_process(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("CreateProcess", e))?;
        Ok(())
    }

    async fn exec_process(&self, id: &ProcessId, spec: &ProcessSpec) -> Result<()> {
        let req = pb::ExecProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            process: protobuf_some(pb::ProcessSpec::from(spec)),
            ..Default::default()
        };
        self.client
            .exec_process(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("ExecProcess", e))?;
        Ok(())
    }

    async fn start_process(&self, id: &ProcessId) -> Result<u32> {
        let req = pb::StartProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .start_process(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("StartProcess", e))?;
        Ok(r.pid)
    }

    async fn signal_process(&self, id: &ProcessId, signal: u32, all: bool) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .signal_process(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("SignalProcess", e))?;
        Ok(())
    }

    async fn wait_process(&self, id: &ProcessId) -> Result<ExitInfo> {
        let req = pb::WaitProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .wait_process(Self::no_timeout(), &req)
            .await
            .map_err(|e| agent_error("WaitProcess", e))?;
        Ok(ExitInfo {
            pid: r.pid,
            status: r.exit_status,
            exited_at: exit_time(r.exited_at_unix_nanos),
            oom_killed: r.oom_killed,
        })
    }

    async fn delete_process(&self, id: &ProcessId) -> Result<()> {
        let req = pb::DeleteProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            ..Default::default()
        };
        self.client
            .delete_process(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("DeleteProcess", e))?;
        Ok(())
    }

    async fn read_output(&self, id: &ProcessId, stream: OutputStream) -> Result<Option<Vec<u8>>> {
        let req = pb::ReadStreamRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            max_bytes: 0,
            ..Default::default()
        };
        let r = match stream {
            OutputStream::Stdout => self.client.read_stdout(Self::no_timeout(), &req).await,
            OutputStream::Stderr => self.client.read_stderr(Self::no_timeout(), &req).await,
        }
        .map_err(|e| agent_error("ReadStream", e))?;
        if r.data.is_empty() && r.eof {
            Ok(None)
        } else {
            Ok(Some(r.data))
        }
    }

    async fn write_stdin(&self, id: &ProcessId, data: &[u8]) -> Result<usize> {
        let req = pb::WriteStdinRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            data: data.to_vec(),
            ..Default::default()
        };
        let r = self
            .client
            .write_stdin(Self::no_timeout(), &req)
            .await
            .map_err(|e| agent_error("WriteStdin", e))?;
        Ok(r.written as usize)
    }

    async fn close_stdin(&self, id: &ProcessId) -> Result<()> {
        let req = pb::CloseStdinRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            ..Default::default()
        };
        self.client
            .close_stdin(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("CloseStdin", e))?;
        Ok(())
    }

    async fn resize_terminal(&self, id: &ProcessId, rows: u32, columns: u32) -> Result<()> {
        let req = pb::ResizeTerminalRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            size: protobuf_some(pb::ConsoleSize {
                rows,
                columns,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .resize_terminal(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("ResizeTerminal", e))?;
        Ok(())
    }

    async fn pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = pb::ListProcessesRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let r = self
            .client
            .list_processes(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("ListProcesses", e))?;
        Ok(r.pids)
    }

    async fn process_stats(&self, id: &ProcessId) -> Result<ProcessStats> {
        let req = pb::ProcessStatsRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            ..Default::default()
        };
        let r = self
            .client
            .process_stats(self.ctx(), &req)
            .await
            .map_err(|e| agent_error("ProcessStats", e))?;
        Ok(ProcessStats {
            cpu_user_ns: r.cpu_user_ns,
            cpu_system_ns: r.cpu_system_ns,
            rss_bytes: r.rss_bytes,
            processes: r.processes,
        })
    }

    async fn shutdown(&self) -> Result<()> {
        self.client
            .shutdown(self.ctx(), &pb::ShutdownRequest::default())
            .await
            .map_err(|e| agent_error("Shutdown", e))?;
        Ok(())
    }

    async fn configure_network(&self, network: &GuestNetwork) -> Result<()> {
        self.client
            .configure_network(self.ctx(), &network_request(network))
            .await
            .map_err(|e| agent_error("ConfigureNetwork", e))?;
        Ok(())
    }
}

/// The `ConfigureNetwork` request for `network`.
fn network_request(network: &GuestNetwork) -> pb::ConfigureNetworkRequest {
    pb::ConfigureNetworkRequest {
        interfaces: network
            .interfaces
            .iter()
            .map(|i| pb::NetworkInterface {
                mac: i.mac.clone(),
                name: i.name.clone(),
                mtu: i.mtu,
                addresses: i
                    .addresses
                    .iter()
                    .map(|(address, prefix)| pb::IpAddress {
                        address: address.to_string(),
                        prefix_len: u32::from(*prefix),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        routes: network
            .routes
            .iter()
            .map(|r| pb::NetworkRoute {
                destination: r.destination.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                source: r.source.clone(),
                metric: r.metric,
                ..Default::default()
            })
            .collect(),
        hostname: network.hostname.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_status_codes_become_shim_errors() {
        let status = |code, msg: &str| ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg));
        let cases = [
            (
                status(ttrpc::Code::NOT_FOUND, "no c1"),
                ttrpc::Code::NOT_FOUND,
            ),
            (
                status(ttrpc::Code::INVALID_ARGUMENT, "x"),
                ttrpc::Code::INVALID_ARGUMENT,
            ),
            (
                status(ttrpc::Code::UNIMPLEMENTED, "x"),
                ttrpc::Code::UNIMPLEMENTED,
            ),
            (status(ttrpc::Code::INTERNAL, "x"), ttrpc::Code::INTERNAL),
            (ttrpc::Error::LocalClosed, ttrpc::Code::UNAVAILABLE),
        ];
        for (err, want) in cases {
            assert_eq!(agent_error("Call", err).code(), want);
        }
    }

    #[test]
    fn process_spec_translation() {
        let spec = ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            cwd: "/".into(),
            uid: 1,
            gid: 2,
            additional_gids: vec![3],
            terminal: true,
            console_size: Some((24, 80)),
            capabilities: Capabilities {
                bounding: vec!["CAP_KILL".into()],
                effective: vec!["CAP_KILL".into()],
                permitted: vec!["CAP_KILL".into(), "CAP_CHOWN".into()],
                inheritable: vec![],
                ambient: vec!["CAP_CHOWN".into()],
            },
            no_new_privileges: true,
            umask: Some(0o027),
            rlimits: vec![],
        };
        let pb = pb::ProcessSpec::from(&spec);
        assert_eq!(pb.args, spec.args);
        assert_eq!(pb.uid, 1);
        assert!(pb.terminal);
        assert_eq!(pb.console_size.rows, 24);
        assert_eq!(pb.console_size.columns, 80);
        assert_eq!(pb.capabilities.bounding, vec!["CAP_KILL"]);
        assert_eq!(pb.capabilities.effective, vec!["CAP_KILL"]);
        assert_eq!(pb.capabilities.permitted, vec!["CAP_KILL", "CAP_CHOWN"]);
        assert!(pb.capabilities.inheritable.is_empty());
        assert_eq!(pb.capabilities.ambient, vec!["CAP_CHOWN"]);
        assert!(pb.no_new_privileges);
        assert_eq!(pb.umask, Some(0o027));
    }

    #[test]
    fn empty_capabilities_are_sent_not_left_unset() {
        // Unset would keep every capability of the agent; empty sets give none.
        let pb = pb::ProcessSpec::from(&ProcessSpec::default());
        assert!(pb.capabilities.is_some());
        assert!(pb.capabilities.bounding.is_empty());
        assert!(pb.capabilities.effective.is_empty());
        assert!(!pb.no_new_privileges);
        assert_eq!(pb.umask, None);
    }

    #[test]
    fn create_request_carries_seccomp_and_namespaces() {
        let mut spec = ContainerSpec {
            container_id: "c1".into(),
            rootfs: "/run/share/c1/rootfs".into(),
            process: ProcessSpec::default(),
            mounts: vec![],
            readonly_rootfs: false,
            seccomp: None,
            namespaces: vec![],
            resources: None,
            annotations: HashMap::from([(
                "io.kubernetes.cri.container-name".to_owned(),
                "app".to_owned(),
            )]),
        };
        let req = create_request(&spec);
        assert_eq!(
            req.annotations, spec.annotations,
            "the agent sees the annotations"
        );
        assert!(req.seccomp.is_none(), "no profile, no filter");
        assert!(req.resources.is_none(), "no resources, no limits");
        assert!(req.namespaces.is_empty());
        assert!(req.process.capabilities.is_some());

        spec.seccomp = Some(Seccomp {
            default_action: "SCMP_ACT_ALLOW".into(),
            default_errno_ret: Some(1),
            architectures: vec!["SCMP_ARCH_X86_64".into()],
            flags: vec!["SECCOMP_FILTER_FLAG_LOG".into()],
            syscalls: vec![SeccompSyscall {
                names: vec!["mkdir".into(), "mkdirat".into()],
                action: "SCMP_ACT_ERRNO".into(),
                errno_ret: Some(13),
                args: vec![SeccompArg {
                    index: 1,
                    value: 0o700,
                    value_two: 0o100,
                    op: "SCMP_CMP_MASKED_EQ".into(),
                }],
            }],
        });
        spec.namespaces = vec![Namespace {
            ns_type: "pid".into(),
            path: String::new(),
        }];
        let req = create_request(&spec);
        let s = &req.seccomp;
        assert_eq!(s.default_action, "SCMP_ACT_ALLOW");
        assert_eq!(s.default_errno_ret, Some(1));
        assert_eq!(s.architectures, vec!["SCMP_ARCH_X86_64"]);
        assert_eq!(s.flags, vec!["SECCOMP_FILTER_FLAG_LOG"]);
        assert_eq!(s.syscalls.len(), 1);
        let rule = &s.syscalls[0];
        assert_eq!(rule.names, vec!["mkdir", "mkdirat"]);
        assert_eq!(rule.action, "SCMP_ACT_ERRNO");
        assert_eq!(rule.errno_ret, Some(13));
        assert_eq!(rule.args.len(), 1);
        assert_eq!(
            (
                rule.args[0].index,
                rule.args[0].value,
                rule.args[0].value_two,
                rule.args[0].op.as_str()
            ),
            (1, 0o700, 0o100, "SCMP_CMP_MASKED_EQ")
        );
        assert_eq!(req.namespaces.len(), 1);
        assert_eq!(req.namespaces[0].type_, "pid");
        assert_eq!(req.namespaces[0].path, "");
    }

    #[test]
    fn create_request_carries_resources_and_rlimits() {
        let spec = ContainerSpec {
            container_id: "c1".into(),
            rootfs: String::new(),
            process: ProcessSpec {
                rlimits: vec![Rlimit {
                    resource: "RLIMIT_NOFILE".into(),
                    soft: 1024,
                    hard: 4096,
                }],
                ..ProcessSpec::default()
            },
            mounts: vec![],
            readonly_rootfs: false,
            seccomp: None,
            namespaces: vec![],
            resources: Some(Resources {
                memory_limit: Some(64 << 20),
                memory_swap: Some(64 << 20),
                cpu_shares: Some(512),
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                pids_limit: Some(100),
                ..Resources::default()
            }),
            annotations: HashMap::new(),
        };
        let req = create_request(&spec);
        let r = &req.resources;
        assert_eq!(
            (r.memory_limit, r.memory_swap, r.memory_reservation),
            (Some(64 << 20), Some(64 << 20), None)
        );
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.cpu_period, r.pids_limit),
            (Some(512), Some(50_000), Some(100_000), Some(100))
        );
        let rlimits = &req.process.rlimits;
        assert_eq!(rlimits.len(), 1);
        assert_eq!(
            (rlimits[0].type_.as_str(), rlimits[0].soft, rlimits[0].hard),
            ("RLIMIT_NOFILE", 1024, 4096)
        );
    }

    #[test]
    fn exit_time_from_guest_clock() {
        assert_eq!(
            exit_time(1_500_000_000_000_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000)
        );
        assert!(exit_time(0) > SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    }
}
