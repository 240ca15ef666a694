//! The ttrpc `AgentService`: a thin layer that translates protocol messages to
//! [`Runtime`] calls and back. Errors become ttrpc statuses in one `From` impl
//! (see [`crate::error`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant, UNIX_EPOCH};

use gpuvm_protocol::agent::{self as pb};
use gpuvm_protocol::agent_ttrpc;
use nix::sys::signal::Signal;
use ttrpc::TtrpcContext;

use crate::error::{Error, Result};
use crate::process::State;
use crate::runtime::Runtime;
use crate::{nvidia, procfs, spec};

/// How long one ReadStdout/ReadStderr call waits for output before it answers empty.
pub const READ_POLL: Duration = Duration::from_secs(10);

/// Facts gathered at boot that GuestInfo reports.
#[derive(Debug, Clone, Default)]
pub struct GuestFacts {
    /// Modules inserted at boot, in order.
    pub loaded_modules: Vec<String>,
    /// Where the virtio-fs share is mounted.
    pub shared_dir: Option<PathBuf>,
    /// Guest uptime when the agent began serving; 0 until then (and outside a VM).
    pub listening_uptime_ns: Arc<AtomicU64>,
    /// The agent is the guest's PID 1 (not process mode on a host): calls that change
    /// the whole system (the network) are allowed.
    pub in_guest: bool,
    /// The NVIDIA driver (loaded on a thread at boot; never in process mode).
    pub nvidia: Arc<nvidia::Driver>,
}

/// The service implementation.
#[derive(Debug)]
pub struct AgentService {
    runtime: Arc<Runtime>,
    facts: GuestFacts,
    shutdown: Sender<()>,
}

impl AgentService {
    /// A service over `runtime`; a Shutdown call sends on `shutdown` after replying.
    pub fn new(runtime: Arc<Runtime>, facts: GuestFacts, shutdown: Sender<()>) -> Self {
        Self {
            runtime,
            facts,
            shutdown,
        }
    }

    /// The ttrpc method table of this service, for `ttrpc::Server::register_service`.
    pub fn into_methods(
        self,
    ) -> std::collections::HashMap<String, Box<dyn ttrpc::MethodHandler + Send + Sync>> {
        agent_ttrpc::create_agent_service(Arc::new(self))
    }
}

fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

fn signal_from(number: u32) -> Result<Signal> {
    i32::try_from(number)
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .ok_or_else(|| Error::invalid(format!("{number} is not a signal number")))
}

fn unix_nanos(time: std::time::SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

fn read_stream(
    runtime: &Runtime,
    req: &pb::ReadStreamRequest,
    stdout: bool,
) -> Result<pb::ReadStreamResponse> {
    let process = runtime.process(&req.container_id, &req.exec_id)?;
    let buffer = if stdout {
        &process.stdout
    } else {
        &process.stderr
    };
    let chunk = buffer.read(req.max_bytes as usize, READ_POLL);
    Ok(pb::ReadStreamResponse {
        data: chunk.data,
        eof: chunk.eof,
        ..Default::default()
    })
}

type Reply<T> = ttrpc::Result<T>;

impl agent_ttrpc::AgentService for AgentService {
    #[tracing::instrument(skip_all)]
    fn ping(&self, _: &TtrpcContext, _: pb::PingRequest) -> Reply<pb::PingResponse> {
        Ok(pb::PingResponse {
            agent_version: version(),
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all)]
    fn guest_info(
        &self,
        _: &TtrpcContext,
        _: pb::GuestInfoRequest,
    ) -> Reply<pb::GuestInfoResponse> {
        let uts = nix::sys::utsname::uname().map_err(|e| Error::io("Calling uname", e))?;
        let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
        Ok(pb::GuestInfoResponse {
            kernel_release: text(uts.release()),
            kernel_version: text(uts.version()),
            machine: text(uts.machine()),
            hostname: text(uts.nodename()),
            agent_version: version(),
            uptime_ns: procfs::parse_uptime_ns(&procfs::read("/proc/uptime")).unwrap_or(0),
            kernel_cmdline: procfs::read("/proc/cmdline").trim().to_string(),
            loaded_modules: self.facts.loaded_modules.clone(),
            shared_dir: self
                .facts
                .shared_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            agent_listening_uptime_ns: self.facts.listening_uptime_ns.load(Ordering::Relaxed),
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all)]
    fn gpu_info(&self, _: &TtrpcContext, _: pb::GpuInfoRequest) -> Reply<pb::GpuInfoResponse> {
        Ok(nvidia::gpu_info(&self.facts.nvidia)?)
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id))]
    fn create_process(
        &self,
        _: &TtrpcContext,
        req: pb::CreateProcessRequest,
    ) -> Reply<pb::CreateProcessResponse> {
        let (mut container, process) = spec::container_spec(&req)?;
        container.gpu = nvidia::container_edits(
            &self.facts.nvidia,
            &container,
            &process.env,
            &req.annotations,
        )?;
        let gpu = container.gpu.is_some();
        self.runtime.create(&req.container_id, container, process)?;
        tracing::info!(gpu, "container created");
        Ok(pb::CreateProcessResponse::default())
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> Reply<pb::ExecProcessResponse> {
        let process = spec::process_spec(req.process.as_ref())?;
        self.runtime
            .exec(&req.container_id, &req.exec_id, process)?;
        Ok(pb::ExecProcessResponse::default())
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    fn start_process(
        &self,
        _: &TtrpcContext,
        req: pb::StartProcessRequest,
    ) -> Reply<pb::StartProcessResponse> {
        let pid = self.runtime.start(&req.container_id, &req.exec_id)?;
        tracing::info!(pid, "process started");
        Ok(pb::StartProcessResponse {
            pid,
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> Reply<pb::SignalProcessResponse> {
        let signal = signal_from(req.signal)?;
        self.runtime
            .signal(&req.container_id, &req.exec_id, signal, req.all)?;
        Ok(pb::SignalProcessResponse::default())
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> Reply<pb::WaitProcessResponse> {
        let process = self.runtime.process(&req.container_id, &req.exec_id)?;
        let exit = process.wait()?;
        Ok(pb::WaitProcessResponse {
            pid: exit.pid,
            exit_status: exit.exit_status,
            signal: exit.signal,
            exited_at_unix_nanos: unix_nanos(exit.exited_at),
            oom_killed: exit.oom_killed,
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    fn delete_process(
        &self,
        _: &TtrpcContext,
        req: pb::DeleteProcessRequest,
    ) -> Reply<pb::DeleteProcessResponse> {
        self.runtime.delete(&req.container_id, &req.exec_id)?;
        Ok(pb::DeleteProcessResponse::default())
    }

    fn read_stdout(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> Reply<pb::ReadStreamResponse> {
        Ok(read_stream(&self.runtime, &req, true)?)
    }

    fn read_stderr(
        &self,
        _: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> Reply<pb::ReadStreamResponse> {
        Ok(read_stream(&self.runtime, &req, false)?)
    }

    fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::WriteStdinRequest,
    ) -> Reply<pb::WriteStdinResponse> {
        let process = self.runtime.process(&req.container_id, &req.exec_id)?;
        let written = process.write_stdin(&req.data)?;
        Ok(pb::WriteStdinResponse {
            written: u32::try_from(written).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    fn close_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> Reply<pb::CloseStdinResponse> {
        self.runtime
            .process(&req.container_id, &req.exec_id)?
            .close_stdin()?;
        Ok(pb::CloseStdinResponse::default())
    }

    fn resize_terminal(
        &self,
        _: &TtrpcContext,
        req: pb::ResizeTerminalRequest,
    ) -> Reply<pb::ResizeTerminalResponse> {
        let size = req
            .size
            .as_ref()
            .and_then(|s| {
                Some(spec::ConsoleSize {
                    rows: u16::try_from(s.rows).ok()?,
                    columns: u16::try_from(s.columns).ok()?,
                })
            })
            .ok_or_else(|| Error::invalid("the terminal size is missing or out of range"))?;
        self.runtime
            .process(&req.container_id, &req.exec_id)?
            .resize(size)?;
        Ok(pb::ResizeTerminalResponse::default())
    }

    #[tracing::instrument(skip_all)]
    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> Reply<pb::ListProcessesResponse> {
        let filter = (!req.container_id.is_empty()).then_some(req.container_id.as_str());
        let processes = self.runtime.processes(filter)?;
        let mut pids = std::collections::BTreeSet::new();
        let mut containers: Vec<&str> = processes.iter().map(|p| p.container_id.as_str()).collect();
        containers.dedup();
        for container in containers {
            pids.extend(self.runtime.container_pids(container)?);
        }
        Ok(pb::ListProcessesResponse {
            processes: processes
                .iter()
                .map(|p| {
                    let state = p.state();
                    let (state, exit_status) = match state {
                        State::Created | State::Starting => {
                            (pb::ProcessState::PROCESS_STATE_CREATED, 0)
                        }
                        State::Running(_) => (pb::ProcessState::PROCESS_STATE_RUNNING, 0),
                        State::Exited(exit) => {
                            (pb::ProcessState::PROCESS_STATE_EXITED, exit.exit_status)
                        }
                    };
                    pb::ProcessInfo {
                        container_id: p.container_id.clone(),
                        exec_id: p.exec_id.clone(),
                        pid: p.pid().unwrap_or(0),
                        state: state.into(),
                        exit_status,
                        ..Default::default()
                    }
                })
                .collect(),
            pids: pids.into_iter().collect(),
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all)]
    fn process_stats(
        &self,
        _: &TtrpcContext,
        req: pb::ProcessStatsRequest,
    ) -> Reply<pb::ProcessStatsResponse> {
        let stats = self.runtime.stats(&req.container_id, &req.exec_id)?;
        Ok(pb::ProcessStatsResponse {
            pid: stats.pid,
            cpu_user_ns: stats.cpu_user_ns,
            cpu_system_ns: stats.cpu_system_ns,
            rss_bytes: stats.rss_bytes,
            vm_size_bytes: stats.vm_size_bytes,
            threads: stats.threads,
            processes: stats.processes,
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all)]
    fn stats(&self, _: &TtrpcContext, _: pb::StatsRequest) -> Reply<pb::StatsResponse> {
        let meminfo = procfs::read("/proc/meminfo");
        let own = procfs::read("/proc/self/status");
        Ok(pb::StatsResponse {
            mem_total_bytes: procfs::parse_kib_field(&meminfo, "MemTotal").unwrap_or(0),
            mem_available_bytes: procfs::parse_kib_field(&meminfo, "MemAvailable").unwrap_or(0),
            uptime_ns: procfs::parse_uptime_ns(&procfs::read("/proc/uptime")).unwrap_or(0),
            load1: procfs::parse_load1(&procfs::read("/proc/loadavg")).unwrap_or(0.0),
            agent_rss_bytes: procfs::parse_kib_field(&own, "VmRSS").unwrap_or(0),
            agent_hwm_bytes: procfs::parse_kib_field(&own, "VmHWM").unwrap_or(0),
            running_processes: u32::try_from(self.runtime.running()).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    #[tracing::instrument(skip_all)]
    fn shutdown(&self, _: &TtrpcContext, _: pb::ShutdownRequest) -> Reply<pb::ShutdownResponse> {
        tracing::info!("shutdown requested");
        let shutdown = self.shutdown.clone();
        // Answer first; the main thread tears down once the reply is on its way.
        std::thread::spawn(move || {
            let start = Instant::now();
            std::thread::sleep(Duration::from_millis(100).saturating_sub(start.elapsed()));
            let _ = shutdown.send(());
        });
        Ok(pb::ShutdownResponse::default())
    }

    #[tracing::instrument(skip_all)]
    fn configure_network(
        &self,
        _: &TtrpcContext,
        req: pb::ConfigureNetworkRequest,
    ) -> Reply<pb::ConfigureNetworkResponse> {
        let config = crate::network::validate(&req)?;
        if !self.facts.in_guest {
            return Err(Error::NotInGuest("ConfigureNetwork").into());
        }
        crate::network::apply(&config)?;
        tracing::info!(
            interfaces = config.interfaces.len(),
            routes = config.routes.len(),
            hostname = config.hostname.as_deref().unwrap_or(""),
            "network configured"
        );
        Ok(pb::ConfigureNetworkResponse::default())
    }
}
