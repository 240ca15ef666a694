//! The containerd Task service: a thin ttrpc layer over methods that return the
//! crate's own `Result`. One [`Service`] per shim process, one sandbox (VM) per shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
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
use tokio::sync::Mutex;
use tracing::instrument;

use crate::agent::{ProcessId, ProcessStats};
use crate::error::{Error, Result};
use crate::sandbox::{
    Checked, ContainerRequest, Exit, FailedResetLocks, NewContainer, Sandbox, SandboxNet, Tasks,
    process_spec, remove_rootfs,
};
use crate::state::{TaskAction, TaskState};
use crate::stdio::StdioPaths;

/// Annotation naming the pod sandbox a container belongs to.
pub const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation saying whether a container is the pod's sandbox (`sandbox`) or an app
/// container (`container`).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

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

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// containerd's process id for a task (`exec_id` empty for the container's init).
fn process_id(id: &str, exec_id: &str) -> ProcessId {
    ProcessId {
        container_id: id.to_owned(),
        exec_id: exec_id.to_owned(),
    }
}

/// The FIFOs containerd gave for one process.
fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

/// The guest's CPU, memory and process counts as containerd's cgroup metrics.
fn metrics(stats: &ProcessStats) -> Metrics {
    let mut metrics = Metrics::new();
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
    metrics
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
    tasks: Tasks,
    /// Held for a whole teardown: a Delete or Shutdown that arrives while the pod
    /// sandbox's Kill is stopping the VM waits for it, so the shim cannot exit under
    /// that Kill (containerd would see "ttrpc: closed").
    teardown_lock: Mutex<()>,
    /// Locks of devices whose reset failed after the VM: kept until the shim exits.
    failed_reset_locks: FailedResetLocks,
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
                tasks: Tasks::default(),
                teardown_lock: Mutex::new(()),
                failed_reset_locks: FailedResetLocks::default(),
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

    /// The sandbox task `req` belongs to: the running one, or (for the task that
    /// names the sandbox) a new one booted now.
    async fn sandbox_for(
        &self,
        req: &api::CreateTaskRequest,
        sandbox_id: &str,
        annotations: &HashMap<String, String>,
        net: &SandboxNet,
    ) -> Result<Arc<Sandbox>> {
        // Not held across the boot: Connect and the other handlers stay answerable.
        let current = self.inner.sandbox.lock().await.clone();
        match current {
            Some(s) if s.id() == sandbox_id => return Ok(s),
            Some(s) => {
                return Err(Error::InvalidArgument(format!(
                    "task {} belongs to sandbox {sandbox_id}, but this shim runs sandbox {}",
                    req.id,
                    s.id()
                )));
            }
            None if sandbox_id != req.id => {
                return Err(Error::NotFound(format!(
                    "sandbox {sandbox_id} for task {} (create the sandbox first)",
                    req.id
                )));
            }
            None => {}
        }
        let option = req
            .options
            .as_ref()
            .and_then(|any| config_path_from_options(&any.type_url, &any.value));
        let bundle = Path::new(&req.bundle);
        let held = &self.inner.failed_reset_locks;
        let sandbox =
            Arc::new(Sandbox::boot(sandbox_id, bundle, annotations, net, option, held).await?);
        *self.inner.sandbox.lock().await = Some(sandbox.clone());
        self.watch_vm(sandbox.clone());
        Ok(sandbox)
    }

    /// When the VM exits (guest power-off, crash, shutdown), every process still
    /// running in it has exited too.
    fn watch_vm(&self, sandbox: Arc<Sandbox>) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = sandbox.wait_exit().await;
            tracing::info!(sandbox = %sandbox.id(), code = exit.vmm_exit_code, "VM exited");
            for id in service.inner.tasks.all_processes().await {
                service
                    .record_exit(&id.container_id, &id.exec_id, 255)
                    .await;
            }
        });
    }

    /// Records a process's exit once, and publishes TaskExit.
    async fn record_exit(&self, container_id: &str, exec_id: &str, status: u32) {
        self.record_exit_at(container_id, exec_id, status, SystemTime::now())
            .await;
    }

    async fn record_exit_at(&self, container_id: &str, exec_id: &str, status: u32, at: SystemTime) {
        let id = process_id(container_id, exec_id);
        let Some(pid) = self.inner.tasks.record_exit(&id, Exit { status, at }).await else {
            return;
        };
        tracing::info!(
            container = container_id,
            exec = exec_id,
            status,
            "process exited"
        );
        let event = TaskExit {
            container_id: container_id.to_owned(),
            id: if exec_id.is_empty() {
                container_id
            } else {
                exec_id
            }
            .to_owned(),
            pid,
            exit_status: status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
            .await;
    }

    /// Stops the VM: agent shutdown, then VM shutdown, then cleanup. Idempotent.
    async fn teardown(&self) {
        let _teardown = self.inner.teardown_lock.lock().await;
        let sandbox = self.inner.sandbox.lock().await.take();
        let Some(sandbox) = sandbox else {
            return;
        };
        let mounts = self.inner.tasks.take_rootfs_mounts().await;
        sandbox.stop(mounts, &self.inner.failed_reset_locks).await;
    }

    async fn save_state(&self, sandbox: &Sandbox) {
        sandbox.save_state(self.inner.tasks.rootfs_mounts().await);
    }

    async fn do_create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let spec = containerd_shim::asynchronous::util::read_spec(&bundle).await?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        let sandbox_id = sandbox_id_of(&req.id, &annotations);
        let pod_sandbox = is_pod_sandbox(&annotations);
        if self.inner.tasks.contains(&req.id).await {
            return Err(Error::AlreadyExists(format!("task {}", req.id)));
        }
        let net = SandboxNet::of(&spec);
        let sandbox = self
            .sandbox_for(&req, &sandbox_id, &annotations, &net)
            .await?;
        let rootfs_mount = if pod_sandbox {
            None
        } else {
            let container = ContainerRequest {
                id: &req.id,
                bundle: &bundle,
                spec: &spec,
                rootfs: &req.rootfs,
                terminal: req.terminal,
            };
            Some(sandbox.create_container(&container).await?)
        };
        let pid = sandbox.vmm_pid();
        let container = NewContainer {
            bundle,
            is_pod_sandbox: pod_sandbox,
            stdio: stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            pid,
            rootfs_mount,
        };
        self.inner.tasks.add_container(&req.id, container).await;
        self.save_state(&sandbox).await;
        tracing::info!(task = %req.id, sandbox = %sandbox_id, pod_sandbox, "task created");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(create_event(&req, pid)),
        )
        .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Applies `action` to a process: the state it leads to, its pid, whether it is
    /// the pod sandbox task.
    async fn check(&self, id: &str, exec_id: &str, action: TaskAction) -> Result<Checked> {
        self.inner.tasks.check(id, exec_id, action).await
    }

    async fn do_start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let checked = self.check(id, exec_id, TaskAction::Start).await?;
        let pid_id = process_id(id, exec_id);
        if checked.pod_sandbox && exec_id.is_empty() {
            // The pod sandbox task is the VM: nothing starts in the guest.
            self.inner
                .tasks
                .set_state(&pid_id, checked.next, None)
                .await;
            self.publish_start(&pid_id, checked.pid).await;
            return Ok(checked.pid);
        }
        let sandbox = self.sandbox().await?;
        let stdio = self.inner.tasks.view(id, exec_id).await?.stdio;
        let (copy, first_start) = sandbox.start_process(&pid_id, &stdio).await?;
        // Execs report the VMM pid too, for the same reason as containers.
        let pid = sandbox.vmm_pid();
        self.inner.tasks.set_copy(&pid_id, copy).await;
        self.inner
            .tasks
            .set_state(&pid_id, checked.next, Some(pid))
            .await;
        tracing::info!(task = id, exec = exec_id, "process started");
        if first_start.is_some() {
            self.save_state(&sandbox).await;
        }
        self.publish_start(&pid_id, pid).await;
        self.spawn_waiter(sandbox, pid_id);
        Ok(pid)
    }

    /// Publishes TaskStart for an init process, TaskExecStarted for an exec.
    async fn publish_start(&self, id: &ProcessId, pid: u32) {
        let container_id = id.container_id.clone();
        if id.exec_id.is_empty() {
            let event = TaskStart {
                container_id,
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
        } else {
            let event = TaskExecStarted {
                container_id,
                exec_id: id.exec_id.clone(),
                pid,
                ..Default::default()
            };
            self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
                .await;
        }
    }

    /// Waits in the guest for the process's exit, lets its output drain, then records it.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, id: ProcessId) {
        let service = self.clone();
        tokio::spawn(async move {
            let exit = sandbox.agent().wait_process(&id).await;
            if let Some(mut copy) = service.inner.tasks.take_copy(&id).await {
                copy.wait_outputs().await;
            }
            let (container_id, exec_id) = (&id.container_id, &id.exec_id);
            match exit {
                Ok(exit) => {
                    if exit.oom_killed {
                        // As runc's shim does: the OOM event comes before the exit, so
                        // CRI reports the container's reason as OOMKilled.
                        tracing::info!(task = %container_id, exec = %exec_id, "OOM-killed in the guest");
                        let event = TaskOOM {
                            container_id: container_id.clone(),
                            ..Default::default()
                        };
                        service
                            .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                            .await;
                    }
                    service
                        .record_exit_at(container_id, exec_id, exit.status, exit.exited_at)
                        .await
                }
                Err(e) => {
                    tracing::warn!(task = %container_id, exec = %exec_id, error = %e, "waiting for the process failed");
                    service.record_exit(container_id, exec_id, 255).await;
                }
            }
        });
    }

    async fn do_wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let mut rx = self.inner.tasks.exit_receiver(id, exec_id).await?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::NotFound(format!("task {id} was deleted while waiting")))?;
        exit.ok_or_else(|| Error::NotFound(format!("task {id}")))
    }

    async fn do_kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let checked = self.check(id, exec_id, TaskAction::Kill).await?;
        if checked.pod_sandbox && exec_id.is_empty() {
            // The pod sandbox task is the VM: stopping it stops the VM. Its exit is
            // the signal's, recorded first so the VM-exit watcher's 255 doesn't win.
            tracing::info!(task = id, signal, "stopping the sandbox VM");
            self.record_exit(id, "", 128 + signal).await;
            self.teardown().await;
            return Ok(());
        }
        let sandbox = self.sandbox().await?;
        if checked.next == TaskState::Created {
            // Nothing runs in the guest yet, so no exit would ever come from there:
            // a kill of a created process ends it here (runc kills its `runc init`).
            self.record_exit(id, exec_id, 128 + signal).await;
            return Ok(());
        }
        let pid = process_id(id, exec_id);
        sandbox.agent().signal_process(&pid, signal, all).await
    }

    async fn do_delete(&self, id: &str, exec_id: &str) -> Result<(u32, Exit)> {
        let checked = self.check(id, exec_id, TaskAction::Delete).await?;
        let exit = self.inner.tasks.view(id, exec_id).await?.exit;
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let sandbox = self.inner.sandbox.lock().await.clone();
        if let Some(sandbox) = &sandbox
            && !(checked.pod_sandbox && exec_id.is_empty())
        {
            sandbox.delete_process(&process_id(id, exec_id)).await;
        }
        if !exec_id.is_empty() {
            self.inner.tasks.remove_exec(id, exec_id).await;
            return Ok((checked.pid, exit));
        }
        if let Some(mount) = self.inner.tasks.remove_container(id).await {
            remove_rootfs(&mount);
        }
        // The task that created the sandbox owns the VM.
        match &sandbox {
            Some(s) if s.id() == id => self.teardown().await,
            Some(s) => self.save_state(s).await,
            None => {}
        }
        tracing::info!(task = id, "task deleted");
        let event = TaskDelete {
            container_id: id.to_owned(),
            id: id.to_owned(),
            pid: checked.pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok((checked.pid, exit))
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
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let tasks = &self.inner.tasks;
        tasks.add_exec(&req.id, &req.exec_id, stdio).await?;
        let pid = process_id(&req.id, &req.exec_id);
        if let Err(e) = sandbox.agent().exec_process(&pid, &spec).await {
            tasks.remove_exec(&req.id, &req.exec_id).await;
            return Err(e);
        }
        let event = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(())
    }

    async fn do_state(&self, id: &str, exec_id: &str) -> Result<api::StateResponse> {
        let p = self.inner.tasks.view(id, exec_id).await?;
        Ok(api::StateResponse {
            id: id.to_owned(),
            bundle: p.bundle.display().to_string(),
            pid: p.pid,
            status: p.state.to_status().into(),
            stdin: p.stdio.stdin,
            stdout: p.stdio.stdout,
            stderr: p.stdio.stderr,
            terminal: p.stdio.terminal,
            exit_status: p.exit.map(|e| e.status).unwrap_or(0),
            exited_at: p.exit.map(|e| timestamp(e.at)).into(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        })
    }

    async fn do_pids(&self, id: &str) -> Result<api::PidsResponse> {
        let checked = self.check(id, "", TaskAction::Io).await?;
        let pids = if checked.pod_sandbox {
            vec![checked.pid]
        } else {
            self.sandbox().await?.agent().pids(id).await?
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
        let checked = self.check(id, "", TaskAction::Io).await?;
        let metrics = if checked.pod_sandbox {
            Metrics::new()
        } else {
            let sandbox = self.sandbox().await?;
            metrics(&sandbox.agent().process_stats(&ProcessId::init(id)).await?)
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn do_shutdown(&self) -> Result<()> {
        if !self.inner.tasks.is_empty().await {
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

/// TaskCreate for `req`, whose task reports `pid`.
fn create_event(req: &api::CreateTaskRequest, pid: u32) -> TaskCreate {
    TaskCreate {
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
        self.inner.tasks.close_stdin(&req.id, &req.exec_id).await?;
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
        let pid = process_id(&req.id, &req.exec_id);
        sandbox
            .agent()
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
            Some(s) => s.vmm_pid(),
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
pub(crate) mod tests {
    use super::*;

    /// Annotations from `(key, value)` pairs.
    pub(crate) fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
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

    /// A pod sandbox task (the VM itself) named `id`, Created.
    async fn add_pod_sandbox(service: &Service, id: &str) {
        let container = NewContainer {
            bundle: PathBuf::from("/b"),
            is_pod_sandbox: true,
            stdio: StdioPaths::default(),
            pid: 0,
            rootfs_mount: None,
        };
        service.inner.tasks.add_container(id, container).await;
    }

    #[tokio::test]
    async fn bad_transitions_answer_failed_precondition() {
        use containerd_shim::protos::ttrpc::Code;
        let service = Service::new("default", Arc::new(ExitSignal::default()), None);
        add_pod_sandbox(&service, "c1").await;
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
        add_pod_sandbox(&service, "pod").await;
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
