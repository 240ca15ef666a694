//! The containers and processes the agent manages, addressed by (container id, exec id).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cgroup::Cgroups;
use crate::error::{Error, Result};
use crate::process::{Launch, Process, State, send_signal};
use crate::procfs;
use crate::security::{CapabilitySets, NamespaceMode, Namespaces};
use crate::spec::{ContainerSpec, ProcessSpec, check_id};

#[derive(Debug)]
struct Container {
    spec: ContainerSpec,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    /// The container's cgroup directory, when the agent manages cgroups.
    cgroup: Option<PathBuf>,
}

/// All containers in the guest.
#[derive(Debug, Default)]
pub struct Runtime {
    containers: Mutex<HashMap<String, Container>>,
    cgroups: Option<Cgroups>,
}

/// CPU and memory use of a process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// The process's pid.
    pub pid: u32,
    /// User CPU time.
    pub cpu_user_ns: u64,
    /// System CPU time.
    pub cpu_system_ns: u64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Virtual memory.
    pub vm_size_bytes: u64,
    /// Threads.
    pub threads: u32,
    /// Processes in the tree.
    pub processes: u32,
}

impl Runtime {
    /// A runtime that puts each container in its own cgroup (in the guest).
    pub fn with_cgroups(cgroups: Cgroups) -> Self {
        Self {
            containers: Mutex::default(),
            cgroups: Some(cgroups),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        // The map is only ever changed by single inserts and removes.
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a container and its init process.
    pub fn create(
        &self,
        container_id: &str,
        spec: ContainerSpec,
        process: ProcessSpec,
    ) -> Result<()> {
        let mut containers = self.lock();
        if containers.contains_key(container_id) {
            return Err(Error::ContainerExists(container_id.to_string()));
        }
        let cgroup = match &self.cgroups {
            Some(cgroups) => Some(Self::limited_cgroup(cgroups, container_id, &spec)?),
            None => {
                if !spec.limits.is_empty() {
                    tracing::warn!(
                        "No cgroups: the limits of container {container_id} are not applied"
                    );
                }
                None
            }
        };
        containers.insert(
            container_id.to_string(),
            Container {
                spec,
                init: Process::new(container_id, "", process),
                execs: HashMap::new(),
                cgroup,
            },
        );
        Ok(())
    }

    /// Creates a container's group and writes its limits; removes it again if they
    /// cannot be written.
    fn limited_cgroup(
        cgroups: &Cgroups,
        container_id: &str,
        spec: &ContainerSpec,
    ) -> Result<PathBuf> {
        let dir = cgroups.create(container_id)?;
        if let Err(e) = cgroups.apply(&dir, &spec.limits) {
            if let Err(removal) = cgroups.remove(&dir) {
                tracing::warn!("{removal}");
            }
            return Err(e);
        }
        Ok(dir)
    }

    /// Registers an extra process in a container.
    pub fn exec(&self, container_id: &str, exec_id: &str, process: ProcessSpec) -> Result<()> {
        check_id("exec id", exec_id)?;
        let mut containers = self.lock();
        let container = containers
            .get_mut(container_id)
            .ok_or_else(|| Error::ContainerNotFound(container_id.to_string()))?;
        if container.execs.contains_key(exec_id) {
            return Err(Error::ProcessExists {
                container_id: container_id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        container.execs.insert(
            exec_id.to_string(),
            Process::new(container_id, exec_id, process),
        );
        Ok(())
    }

    /// Looks a process up.
    pub fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let containers = self.lock();
        let container = containers
            .get(container_id)
            .ok_or_else(|| Error::ContainerNotFound(container_id.to_string()))?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&container.init));
        }
        container
            .execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::ProcessNotFound {
                container_id: container_id.to_string(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Starts a registered process and returns its pid.
    pub fn start(&self, container_id: &str, exec_id: &str) -> Result<u32> {
        let process = self.process(container_id, exec_id)?;
        let (spec, cgroup) = {
            let containers = self.lock();
            containers
                .get(container_id)
                .map(|c| (c.spec.clone(), c.cgroup.clone()))
                .ok_or_else(|| Error::ContainerNotFound(container_id.to_string()))?
        };
        let cgroup = cgroup.as_deref();
        if exec_id.is_empty() {
            if process.state() == State::Created {
                update_ldcache(container_id, &spec);
            }
            return process.start(Launch::NewContainer(&spec), cgroup);
        }
        let init = self.process(container_id, "")?;
        if spec.rootfs.is_none() && spec.namespaces.is_shared() {
            return process.start(Launch::Guest(&spec), cgroup);
        }
        match init.state() {
            State::Running(init_pid) => process.start(
                Launch::JoinContainer {
                    init_pid,
                    container: &spec,
                },
                cgroup,
            ),
            other => Err(Error::WrongState {
                container_id: container_id.to_string(),
                exec_id: String::new(),
                expected: "running (to exec into it)",
                actual: other.name(),
            }),
        }
    }

    /// Signals one process, or with `all` every process of the container.
    pub fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: Signal,
        all: bool,
    ) -> Result<()> {
        if !all {
            return self.process(container_id, exec_id)?.signal(signal);
        }
        for pid in self.container_pids(container_id)? {
            send_signal(pid, signal)?;
        }
        Ok(())
    }

    /// Every live guest pid of a container: its running processes and descendants.
    pub fn container_pids(&self, container_id: &str) -> Result<BTreeSet<u32>> {
        let roots: Vec<u32> = self
            .processes(Some(container_id))?
            .iter()
            .filter_map(|p| match p.state() {
                State::Running(pid) => Some(pid),
                _ => None,
            })
            .collect();
        Ok(procfs::descendants(
            &procfs::all_pid_stats(Path::new("/proc")),
            &roots,
        ))
    }

    /// The processes of one container, or of all.
    pub fn processes(&self, container_id: Option<&str>) -> Result<Vec<Arc<Process>>> {
        let containers = self.lock();
        let mut out = Vec::new();
        let mut add = |c: &Container| {
            out.push(Arc::clone(&c.init));
            out.extend(c.execs.values().cloned());
        };
        match container_id {
            Some(id) => add(containers
                .get(id)
                .ok_or_else(|| Error::ContainerNotFound(id.to_string()))?),
            None => containers.values().for_each(add),
        }
        Ok(out)
    }

    /// Forgets an exec, or a whole container when `exec_id` is empty. Running execs of
    /// a deleted container are killed.
    pub fn delete(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let process = self.process(container_id, exec_id)?;
        if let State::Running(_) | State::Starting = process.state() {
            return Err(Error::WrongState {
                container_id: container_id.to_string(),
                exec_id: exec_id.to_string(),
                expected: "created or exited",
                actual: process.state().name(),
            });
        }
        let mut cgroup = None;
        let removed: Vec<Arc<Process>> = {
            let mut containers = self.lock();
            if exec_id.is_empty() {
                containers
                    .remove(container_id)
                    .map(|c| {
                        cgroup = c.cgroup;
                        std::iter::once(c.init)
                            .chain(c.execs.into_values())
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                containers
                    .get_mut(container_id)
                    .and_then(|c| c.execs.remove(exec_id))
                    .into_iter()
                    .collect()
            }
        };
        for process in removed {
            if let State::Running(pid) = process.state() {
                send_signal(pid, Signal::SIGKILL)?;
            }
            process.mark_deleted();
        }
        if let (Some(cgroups), Some(dir)) = (&self.cgroups, cgroup) {
            // Also kills what the container left behind (daemons, orphans).
            cgroups.remove(&dir)?;
        }
        Ok(())
    }

    /// CPU and memory of a process and its descendants.
    pub fn stats(&self, container_id: &str, exec_id: &str) -> Result<TreeStats> {
        let process = self.process(container_id, exec_id)?;
        let State::Running(pid) = process.state() else {
            return Err(Error::WrongState {
                container_id: container_id.to_string(),
                exec_id: exec_id.to_string(),
                expected: "running",
                actual: process.state().name(),
            });
        };
        let stats = procfs::all_pid_stats(Path::new("/proc"));
        let tree = procfs::descendants(&stats, &[pid]);
        let tick_ns = 1_000_000_000 / clock_ticks_per_second();
        let page = page_size();
        let mut out = TreeStats {
            pid,
            ..TreeStats::default()
        };
        for stat in stats.iter().filter(|s| tree.contains(&s.pid)) {
            out.cpu_user_ns += stat.utime_ticks * tick_ns;
            out.cpu_system_ns += stat.stime_ticks * tick_ns;
            out.rss_bytes += stat.rss_pages * page;
            out.vm_size_bytes += stat.vsize_bytes;
            out.threads += stat.threads;
            out.processes += 1;
        }
        Ok(out)
    }

    /// How many managed processes are running.
    pub fn running(&self) -> usize {
        self.processes(None)
            .unwrap_or_default()
            .iter()
            .filter(|p| matches!(p.state(), State::Running(_)))
            .count()
    }

    /// SIGKILLs every running managed process and its descendants.
    pub fn kill_all(&self) {
        let roots: Vec<u32> = self
            .processes(None)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| match p.state() {
                State::Running(pid) => Some(pid),
                _ => None,
            })
            .collect();
        for pid in procfs::descendants(&procfs::all_pid_stats(Path::new("/proc")), &roots) {
            if let Err(e) = send_signal(pid, Signal::SIGKILL) {
                tracing::warn!("{}", crate::error::chain(&e));
            }
        }
    }
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(4096)
}

/// How long the container's `ldconfig` may run.
const LDCONFIG_TIMEOUT: Duration = Duration::from_secs(60);

/// The CDI `update-ldcache` hook: runs the container's own `/sbin/ldconfig`, chrooted
/// into its rootfs with the driver's libraries mounted, so its `/etc/ld.so.cache`
/// lists them. The program is the tenant's: it runs as uid 0 with no capability at
/// all, `no_new_privs`, new pid/ipc/uts namespaces and nothing mounted but the
/// rootfs and the driver's files. A missing `ldconfig` is fine (musl images); a
/// failing one is logged, the container still starts (the soname links are there).
fn update_ldcache(container_id: &str, spec: &ContainerSpec) {
    let Some(gpu) = spec.gpu.as_ref().filter(|g| g.update_ldcache) else {
        return;
    };
    let hook = ContainerSpec {
        rootfs: spec.rootfs.clone(),
        gpu: Some(crate::cdi::ContainerEdits {
            device_nodes: Vec::new(),
            ..gpu.clone()
        }),
        namespaces: Namespaces {
            pid: NamespaceMode::New,
            ipc: NamespaceMode::New,
            uts: NamespaceMode::New,
        },
        ..ContainerSpec::default()
    };
    let ldconfig = ProcessSpec {
        args: vec!["/sbin/ldconfig".into()],
        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
        cwd: PathBuf::from("/"),
        capabilities: Some(CapabilitySets::default()),
        no_new_privileges: true,
        ..ProcessSpec::default()
    };
    let process = Process::new(container_id, "gpuvm-ldconfig", ldconfig);
    match process.run_to_completion(Launch::NewContainer(&hook), LDCONFIG_TIMEOUT) {
        Ok(done) if done.exit.exit_status == 0 => {
            tracing::info!(container_id, "ldconfig updated the container's cache");
        }
        Ok(done) => tracing::warn!(
            container_id,
            status = done.exit.exit_status,
            stderr = %String::from_utf8_lossy(&done.stderr),
            "the container's ldconfig failed"
        ),
        Err(Error::ExecutableNotFound { .. }) => {
            tracing::info!(container_id, "the container has no /sbin/ldconfig");
        }
        Err(error) => tracing::warn!(
            container_id,
            "running the container's ldconfig failed: {}",
            crate::error::chain(&error)
        ),
    }
}
