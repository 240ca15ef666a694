//! The sandbox's tasks: each container's init process and its execs, with their
//! lifecycle state ([`TaskState`]), stdio and exit. Bookkeeping only: the Task service
//! drives the guest and publishes the events around it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Mutex, watch};

use super::ContainerShare;
use crate::agent::ProcessId;
use crate::error::{Error, Result};
use crate::state::{TaskAction, TaskState};
use crate::stdio::{StdioCopy, StdioPaths};

/// A process's recorded exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal for a signal).
    pub status: u32,
    /// When it exited.
    pub at: SystemTime,
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
    fn new(stdio: StdioPaths, pid: u32) -> Process {
        Process {
            state: TaskState::Created,
            pid,
            stdio,
            copy: None,
            exit_tx: Arc::new(watch::channel(None).0),
        }
    }

    fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }
}

/// One container: its init process, its execs, its bundle and its footprint in the share.
#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// The pod sandbox task: it *is* the VM.
    is_pod_sandbox: bool,
    init: Process,
    execs: HashMap<String, Process>,
    share: Option<ContainerShare>,
}

impl Container {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in task {id}")))
    }

    fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

/// A new container task.
#[derive(Debug)]
pub struct NewContainer {
    /// Its bundle.
    pub bundle: PathBuf,
    /// Whether it is the CRI pod sandbox (the VM itself).
    pub is_pod_sandbox: bool,
    /// Its init process's stdio.
    pub stdio: StdioPaths,
    /// The pid reported for it (the VMM's).
    pub pid: u32,
    /// Its rootfs and volumes in the share, if it has them (not the pod sandbox).
    pub share: Option<ContainerShare>,
}

/// A process after a state check: the state the action leads to, its pid, and
/// whether it is the pod sandbox's task.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    /// The state after the action.
    pub next: TaskState,
    /// The process's pid.
    pub pid: u32,
    /// The container is the pod sandbox (the VM itself).
    pub pod_sandbox: bool,
}

/// One process as the State call reports it.
#[derive(Debug, Clone)]
pub struct ProcessView {
    /// The container's bundle.
    pub bundle: PathBuf,
    /// Its pid.
    pub pid: u32,
    /// Its state.
    pub state: TaskState,
    /// Its stdio.
    pub stdio: StdioPaths,
    /// Its exit, once it exited.
    pub exit: Option<Exit>,
}

/// Every task of the sandbox, by container id.
#[derive(Debug, Default)]
pub struct Tasks(Mutex<HashMap<String, Container>>);

impl Tasks {
    /// Whether no container is left.
    pub async fn is_empty(&self) -> bool {
        self.0.lock().await.is_empty()
    }

    /// Whether container `id` exists.
    pub async fn contains(&self, id: &str) -> bool {
        self.0.lock().await.contains_key(id)
    }

    /// Adds container `id` (Created).
    pub async fn add_container(&self, id: &str, new: NewContainer) {
        let container = Container {
            bundle: new.bundle,
            is_pod_sandbox: new.is_pod_sandbox,
            init: Process::new(new.stdio, new.pid),
            execs: HashMap::new(),
            share: new.share,
        };
        self.0.lock().await.insert(id.to_owned(), container);
    }

    /// Removes container `id`; returns its footprint in the share.
    pub async fn remove_container(&self, id: &str) -> Option<ContainerShare> {
        self.0.lock().await.remove(id).and_then(|c| c.share)
    }

    /// Adds exec `exec_id` to container `id` (Created).
    pub async fn add_exec(&self, id: &str, exec_id: &str, stdio: StdioPaths) -> Result<()> {
        let mut containers = self.0.lock().await;
        let c = containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        if c.execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!("exec {exec_id} in task {id}")));
        }
        c.execs.insert(exec_id.to_owned(), Process::new(stdio, 0));
        Ok(())
    }

    /// Removes exec `exec_id` of container `id`.
    pub async fn remove_exec(&self, id: &str, exec_id: &str) {
        if let Some(c) = self.0.lock().await.get_mut(id) {
            c.execs.remove(exec_id);
        }
    }

    /// Applies `action` to a process: the state it leads to, or the error containerd
    /// should see.
    pub async fn check(&self, id: &str, exec_id: &str, action: TaskAction) -> Result<Checked> {
        let containers = self.0.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = c.process(id, exec_id)?;
        let label = if exec_id.is_empty() {
            id.to_owned()
        } else {
            format!("{id}/{exec_id}")
        };
        Ok(Checked {
            next: p.state.apply(&label, action)?,
            pid: p.pid,
            pod_sandbox: c.is_pod_sandbox,
        })
    }

    /// Sets a process's state (an exit recorded meanwhile wins over Running) and, when
    /// given, its pid.
    pub async fn set_state(&self, id: &ProcessId, state: TaskState, pid: Option<u32>) {
        let mut containers = self.0.lock().await;
        let Some(p) = containers
            .get_mut(&id.container_id)
            .and_then(|c| c.process_mut(&id.exec_id))
        else {
            return;
        };
        if p.exit().is_none() {
            p.state = state;
        }
        if let Some(pid) = pid {
            p.pid = pid;
        }
    }

    /// A process's state, stdio and exit.
    pub async fn view(&self, id: &str, exec_id: &str) -> Result<ProcessView> {
        let containers = self.0.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        let p = c.process(id, exec_id)?;
        Ok(ProcessView {
            bundle: c.bundle.clone(),
            pid: p.pid,
            state: p.state,
            stdio: p.stdio.clone(),
            exit: p.exit(),
        })
    }

    /// Keeps a started process's stdio copy.
    pub async fn set_copy(&self, id: &ProcessId, copy: StdioCopy) {
        let mut containers = self.0.lock().await;
        if let Some(p) = containers
            .get_mut(&id.container_id)
            .and_then(|c| c.process_mut(&id.exec_id))
        {
            p.copy = Some(copy);
        }
    }

    /// Takes a process's stdio copy (to drain it after the exit).
    pub async fn take_copy(&self, id: &ProcessId) -> Option<StdioCopy> {
        let mut containers = self.0.lock().await;
        containers
            .get_mut(&id.container_id)
            .and_then(|c| c.process_mut(&id.exec_id))
            .and_then(|p| p.copy.take())
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let containers = self.0.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        if let Some(copy) = &c.process(id, exec_id)?.copy {
            copy.close_stdin();
        }
        Ok(())
    }

    /// Records a process's exit, once: the pid to report when this call recorded it,
    /// `None` when it was recorded before (or the process is gone).
    pub async fn record_exit(&self, id: &ProcessId, exit: Exit) -> Option<u32> {
        let mut containers = self.0.lock().await;
        let p = containers
            .get_mut(&id.container_id)
            .and_then(|c| c.process_mut(&id.exec_id))?;
        if p.exit().is_some() {
            return None;
        }
        p.state = p.state.apply(&id.container_id, TaskAction::Exit).ok()?;
        p.exit_tx.send_replace(Some(exit));
        Some(p.pid)
    }

    /// A receiver that sees the process's exit.
    pub async fn exit_receiver(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<watch::Receiver<Option<Exit>>> {
        let containers = self.0.lock().await;
        let c = containers
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("task {id}")))?;
        Ok(c.process(id, exec_id)?.exit_tx.subscribe())
    }

    /// Every process (container inits and execs).
    pub async fn all_processes(&self) -> Vec<ProcessId> {
        let containers = self.0.lock().await;
        containers
            .iter()
            .flat_map(|(cid, c)| {
                std::iter::once(ProcessId::init(cid)).chain(c.execs.keys().map(|e| ProcessId {
                    container_id: cid.clone(),
                    exec_id: e.clone(),
                }))
            })
            .collect()
    }

    /// The containers' host mounts (volumes and rootfs).
    pub async fn host_mounts(&self) -> Vec<PathBuf> {
        let containers = self.0.lock().await;
        containers
            .values()
            .filter_map(|c| c.share.as_ref())
            .flat_map(|s| s.mounts.iter().cloned())
            .collect()
    }

    /// Takes the containers' host mounts (for teardown: they go with the VM).
    pub async fn take_host_mounts(&self) -> Vec<PathBuf> {
        let mut containers = self.0.lock().await;
        containers
            .values_mut()
            .filter_map(|c| c.share.take())
            .flat_map(|s| s.mounts)
            .collect()
    }
}
