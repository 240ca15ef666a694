//! The host side of one VM, the same for every backend: its private work dir, the
//! helpers' log files, `virtiofsd`, and the list of processes started for it (what the
//! state file records, what is waited on and what cleanup stops).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::{RecordedProcess, SpawnHook, VmExit, VmRecord, VmSpec};
use crate::cgroup::JoinFds;
use crate::config::ShimConfig;
use crate::error::{Error, Result};
use crate::process::{WatchedProcess, wait_for_socket};

/// How long a helper may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a helper gets between SIGTERM and SIGKILL at cleanup.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How virtiofsd is confined, spelled out rather than left to its defaults: its own
/// mount, pid and net namespaces with the shared dir as its root (`namespace` needs
/// CAP_SYS_ADMIN, so root), a seccomp filter that kills it on any syscall outside its
/// list, and submounts announced to the guest (each rootfs mount its own device there,
/// so inode numbers never collide across them). No `--xattr`: the guest gets no
/// extended attributes (no security.capability) on the host's files.
pub const VIRTIOFSD_SANDBOX_ARGS: [&str; 3] = [
    "--sandbox=namespace",
    "--seccomp=kill",
    "--announce-submounts",
];

/// One VM's footprint on the host, shared by both backends.
#[derive(Debug)]
pub struct VmHost {
    spec: VmSpec,
    /// The VMM's name in the process list (`cloud-hypervisor`, `qemu`).
    vmm_name: &'static str,
    virtiofsd_binary: PathBuf,
    shutdown_timeout: Duration,
    /// Every process started for the VM, in start order.
    processes: std::sync::Mutex<Vec<WatchedProcess>>,
}

impl VmHost {
    /// The host side of the VM `spec`, whose VMM process will be called `vmm_name`.
    pub fn new(config: &ShimConfig, spec: VmSpec, vmm_name: &'static str) -> VmHost {
        VmHost {
            spec,
            vmm_name,
            virtiofsd_binary: config.binaries.virtiofsd.clone(),
            shutdown_timeout: Duration::from_secs(config.timeouts.vm_shutdown_secs),
            processes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The VM this is the host side of.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// How long the VMM gets to exit after it is asked to stop.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }

    /// Creates the VM's private work directory (mode 0700).
    pub fn create_work_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = &self.spec.work_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io(format!("cannot create {}", dir.display())))
    }

    /// Opens (creates) the log file `name` in the work dir, for a helper's output.
    pub fn log_file(&self, name: &str) -> Result<Stdio> {
        let path = self.spec.work_dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Error::io(format!(
                "cannot open log file {}",
                path.display()
            )))?;
        Ok(Stdio::from(file))
    }

    /// Spawns a helper (or, under the VMM's name, the VMM) in the pod's cgroup (joined
    /// between fork and exec, so its memory is the pod's from the first page), adds it
    /// to the process list and calls `spawned` with the record so far. It is in the
    /// list before anything can fail, so cleanup always finds it.
    pub fn spawn(
        &self,
        name: &str,
        binary: &Path,
        mut command: Command,
        spawned: &SpawnHook<'_>,
    ) -> Result<WatchedProcess> {
        let cgroups = JoinFds::open(&self.spec.cgroups)?;
        cgroups.join_before_exec(&mut command);
        if let Some(numa) = &self.spec.numa {
            crate::numa::bind_before_exec(numa, &mut command);
        }
        let process = WatchedProcess::spawn(name, binary, command).map_err(|e| match e {
            // The child reports a failed join as the spawn's error: name the cgroup.
            Error::Io { context, source } if !self.spec.cgroups.is_empty() => Error::Io {
                context: format!(
                    "{context}, joining the pod's cgroup {} before exec",
                    self.spec.cgroups[0].display()
                ),
                source,
            },
            other => other,
        })?;
        drop(cgroups);
        self.lock().push(process.clone());
        spawned(&self.record());
        Ok(process)
    }

    /// Spawns the VMM (see [`VmHost::spawn`]), inside the VM's network namespace
    /// when it has one: the taps are there, and the VMM sees no host interface.
    pub fn spawn_vmm(
        &self,
        binary: &Path,
        mut command: Command,
        spawned: &SpawnHook<'_>,
    ) -> Result<WatchedProcess> {
        if let Some(netns) = &self.spec.netns {
            enter_netns_at_exec(&mut command, netns)?;
        }
        self.spawn(self.vmm_name, binary, command, spawned)
    }

    /// Starts `virtiofsd` for the VM's shared directory and waits for its socket; does
    /// nothing when the VM has no shared directory.
    pub async fn start_virtiofsd(&self, spawned: &SpawnHook<'_>) -> Result<()> {
        let Some(shared_dir) = &self.spec.shared_dir else {
            return Ok(());
        };
        let socket = self.spec.virtiofs_socket();
        let mut cmd = Command::new(&self.virtiofsd_binary);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .args(VIRTIOFSD_SANDBOX_ARGS)
            .arg("--cache=auto")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log_file("virtiofsd.log")?);
        let process = self.spawn("virtiofsd", &self.virtiofsd_binary, cmd, spawned)?;
        self.wait_for_socket(&socket, &process).await
    }

    /// Waits until `process` has created `socket`, failing early if it exits.
    pub async fn wait_for_socket(&self, socket: &Path, process: &WatchedProcess) -> Result<()> {
        wait_for_socket(socket, process, SOCKET_TIMEOUT).await
    }

    /// The VMM process, once started.
    pub fn vmm(&self) -> Option<WatchedProcess> {
        self.snapshot()
            .into_iter()
            .find(|p| p.name() == self.vmm_name)
    }

    /// Waits for the VMM to exit (`-1` when it was never started).
    pub async fn wait_exit(&self) -> VmExit {
        match self.vmm() {
            Some(vmm) => VmExit {
                vmm_exit_code: vmm.wait().await.code,
            },
            None => VmExit { vmm_exit_code: -1 },
        }
    }

    /// The processes and the work dir, for the state file.
    pub fn record(&self) -> VmRecord {
        VmRecord {
            processes: self
                .snapshot()
                .iter()
                .map(|p| RecordedProcess {
                    name: p.name().to_owned(),
                    pid: p.pid(),
                    binary: p.binary().to_owned(),
                })
                .collect(),
            work_dir: self.spec.work_dir.clone(),
        }
    }

    /// Stops every process (last started first) and removes the work dir.
    pub async fn stop_all(&self) {
        for process in self.snapshot().iter().rev() {
            process.stop(STOP_GRACE).await;
        }
        crate::rootfs::remove_dir_if_unmounted(&self.spec.work_dir);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WatchedProcess>> {
        match self.processes.lock() {
            Ok(list) => list,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn snapshot(&self) -> Vec<WatchedProcess> {
        self.lock().clone()
    }
}

/// Makes `command`'s child enter the network namespace at `netns` before it execs.
fn enter_netns_at_exec(command: &mut Command, netns: &Path) -> Result<()> {
    let file = std::fs::File::open(netns).map_err(Error::io(format!(
        "opening the pod's network namespace {}",
        netns.display()
    )))?;
    let namespace = std::os::fd::OwnedFd::from(file);
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setns(2), which is async-signal-safe; the fd it uses is owned by the closure
    // (close-on-exec, so the VMM does not inherit it).
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::sample_spec;

    #[tokio::test]
    async fn spawned_processes_are_recorded_waited_on_and_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = sample_spec();
        spec.work_dir = dir.path().join("vm");
        let host = VmHost::new(&ShimConfig::default(), spec, "vmm");
        host.create_work_dir().expect("work dir");
        assert_eq!(host.wait_exit().await.vmm_exit_code, -1);

        let seen = std::sync::Mutex::new(Vec::new());
        let hook = |record: &VmRecord| {
            seen.lock().expect("lock").push(record.processes.len());
        };
        let sleep = Path::new("/bin/sleep");
        let mut helper = Command::new(sleep);
        helper.arg("60");
        host.spawn("helper", sleep, helper, &hook).expect("helper");
        let mut vmm = Command::new(sleep);
        vmm.arg("60").stdout(host.log_file("vmm.log").expect("log"));
        let vmm = host.spawn_vmm(sleep, vmm, &hook).expect("vmm");
        assert_eq!(*seen.lock().expect("lock"), vec![1, 2]);
        assert_eq!(host.vmm().map(|p| p.pid()), Some(vmm.pid()));
        let names: Vec<String> = host
            .record()
            .processes
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, vec!["helper", "vmm"]);
        assert!(host.spec().work_dir.join("vmm.log").exists());

        host.stop_all().await;
        assert_eq!(host.wait_exit().await.vmm_exit_code, 128 + libc::SIGTERM);
        assert!(!host.spec().work_dir.exists(), "work dir left behind");
    }
}
