//! Helper processes (VMM, virtiofsd, vhost-device-vsock): spawn, watch, stop.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use crate::error::{Error, Result};

/// How a watched process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, or 128 + signal number when it was killed by a signal.
    pub code: i32,
}

impl From<ExitStatus> for ProcessExit {
    fn from(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        let code = status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        ProcessExit { code }
    }
}

/// A child process whose exit is observed by a background task.
#[derive(Debug, Clone)]
pub struct WatchedProcess {
    name: String,
    binary: PathBuf,
    pid: u32,
    exit: watch::Receiver<Option<ProcessExit>>,
}

impl WatchedProcess {
    /// Spawns `command` and starts watching it. `name` is used in messages.
    pub fn spawn(name: &str, binary: &Path, mut command: Command) -> Result<WatchedProcess> {
        // The shim must not leave VMMs behind if it is killed: they die with their
        // parent only if we ask; cleanup after a crash is `shim delete`'s job.
        let mut child = command
            .kill_on_drop(false)
            .spawn()
            .map_err(Error::io(format!(
                "cannot start {name} ({})",
                binary.display()
            )))?;
        let pid = child.id().ok_or_else(|| {
            Error::Hypervisor(format!("{name} exited before it could be watched"))
        })?;
        let (tx, rx) = watch::channel(None);
        let task_name = name.to_owned();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => ProcessExit::from(status),
                Err(e) => {
                    tracing::warn!(process = %task_name, error = %e, "cannot wait for process");
                    ProcessExit { code: -1 }
                }
            };
            tracing::debug!(process = %task_name, code = exit.code, "process exited");
            let _ = tx.send(Some(exit));
        });
        Ok(WatchedProcess {
            name: name.to_owned(),
            binary: binary.to_owned(),
            pid,
            exit: rx,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The binary that was started.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The exit, if it has happened.
    pub fn exited(&self) -> Option<ProcessExit> {
        *self.exit.borrow()
    }

    /// Waits until the process exits.
    pub async fn wait(&self) -> ProcessExit {
        let mut rx = self.exit.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.unwrap_or(ProcessExit { code: -1 }),
            // The watcher task is gone: the runtime is shutting down.
            Err(_) => ProcessExit { code: -1 },
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL and waits for the exit.
    pub async fn stop(&self, grace: Duration) -> ProcessExit {
        if let Some(exit) = self.exited() {
            return exit;
        }
        self.signal(Signal::SIGTERM);
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            return exit;
        }
        tracing::warn!(process = %self.name, "process ignored SIGTERM, killing it");
        self.signal(Signal::SIGKILL);
        self.wait().await
    }

    fn signal(&self, signal: Signal) {
        if self.exited().is_some() {
            return;
        }
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        // ESRCH just means it is already gone.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Waits until `path` exists, failing early if `process` exits first.
pub async fn wait_for_socket(
    path: &Path,
    process: &WatchedProcess,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(exit) = process.exited() {
            return Err(Error::Hypervisor(format!(
                "{} exited with code {} before creating {}",
                process.name(),
                exit.code,
                path.display()
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{} to create {}", process.name(), path.display()),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a process recorded by an earlier shim instance, but only if `/proc/<pid>/exe`
/// still names the binary that was started (the pid may have been reused since).
/// Returns whether a process was signalled.
pub fn kill_recorded(pid: u32, binary: &Path) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    let exe = match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(exe) => exe,
        Err(_) => return false,
    };
    let expected = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    // A binary replaced on disk shows as "<path> (deleted)".
    let exe_text = exe.to_string_lossy();
    let exe_path = exe_text.trim_end_matches(" (deleted)");
    if Path::new(exe_path) != expected {
        return false;
    }
    kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_code_and_signal_are_observed() {
        let sh = Path::new("/bin/sh");
        let mut cmd = Command::new(sh);
        cmd.args(["-c", "exit 7"]);
        let p = WatchedProcess::spawn("sh", sh, cmd).expect("spawn");
        assert_eq!(p.wait().await.code, 7);

        let mut cmd = Command::new(sh);
        cmd.args(["-c", "sleep 30"]);
        let p = WatchedProcess::spawn("sleeper", sh, cmd).expect("spawn");
        let exit = p.stop(Duration::from_secs(5)).await;
        assert_eq!(exit.code, 128 + libc::SIGTERM);
    }

    #[tokio::test]
    async fn socket_wait_fails_fast_when_the_process_dies() {
        let sh = Path::new("/bin/sh");
        let mut cmd = Command::new(sh);
        cmd.args(["-c", "exit 3"]);
        let p = WatchedProcess::spawn("vmm", sh, cmd).expect("spawn");
        let err = wait_for_socket(Path::new("/nonexistent/sock"), &p, Duration::from_secs(10))
            .await
            .expect_err("must fail");
        assert!(err.to_string().contains("exited with code 3"), "{err}");
    }
}
