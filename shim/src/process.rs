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

/// Waits until none of `pids` runs any more (gone, or a zombie: its files are closed),
/// for at most `timeout`; returns those still running then.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let running: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|pid| is_running(*pid))
            .collect();
        if running.is_empty() || std::time::Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold
        // spaces or parentheses itself.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Kills (SIGKILL) every process, other than this one, one of whose arguments names a
/// path inside `dir` (its sockets, logs or shared dir). The VM's work dir is unique to
/// its sandbox, so this finds helpers started for that VM even when the shim was killed
/// between spawning one and recording its pid in the state file. Returns the pids killed.
pub fn kill_naming_dir(dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    if dir.as_os_str().is_empty() {
        return killed;
    }
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let names_dir = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg_names_dir(arg, dir));
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if names_dir && kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            killed.push(pid);
        }
    }
    killed
}

/// Whether one command-line argument names `dir` or a path inside it, on its own or as
/// the value of an option (`--socket-path=<dir>/fs.sock`, `socket=<dir>/v.sock,cid=3`).
fn arg_names_dir(arg: &[u8], dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = dir.as_os_str().as_bytes();
    let dir = dir.strip_suffix(b"/").unwrap_or(dir);
    let mut from = 0;
    while let Some(at) = arg[from..].windows(dir.len()).position(|w| w == dir) {
        let start = from + at;
        let end = start + dir.len();
        // The match must start a path (argument start, or after `=`/`,`/`:`) and end
        // at a path boundary, so /run/gpuvm/ab never matches /run/gpuvm/abc.
        let starts_path = start == 0 || matches!(arg[start - 1], b'=' | b',' | b':');
        let ends_path = end == arg.len() || matches!(arg[end], b'/' | b',' | b':');
        if starts_path && ends_path {
            return true;
        }
        from = start + 1;
        if from >= arg.len() {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_argument_names_a_dir_only_at_path_boundaries() {
        let dir = Path::new("/run/gpuvm/ab");
        for yes in [
            "/run/gpuvm/ab",
            "/run/gpuvm/ab/fs.sock",
            "--socket-path=/run/gpuvm/ab/fs.sock",
            "guest-cid=3,socket=/run/gpuvm/ab/v.sock,uds-path=/x",
            "path=/run/gpuvm/ab",
        ] {
            assert!(arg_names_dir(yes.as_bytes(), dir), "{yes}");
        }
        for no in [
            "/run/gpuvm/abc/fs.sock",
            "/tmp/run/gpuvm/ab/fs.sock",
            "--socket-path=/run/gpuvm/abc",
            "",
        ] {
            assert!(!arg_names_dir(no.as_bytes(), dir), "{no}");
        }
    }

    #[tokio::test]
    async fn processes_naming_a_dir_are_killed_and_others_spared() {
        let work = tempfile::tempdir().expect("tempdir");
        let dir = work.path().join("vm");
        // A shell that keeps its own argv (no exec of the last command), whose
        // children live for at most 0.2 s after it is killed.
        const LOOP: &str = "while :; do sleep 0.2; done";
        let sh = Path::new("/bin/sh");
        let mut naming = Command::new(sh);
        naming.args(["-c", LOOP, "sh"]).arg(dir.join("vmm.sock"));
        let naming = WatchedProcess::spawn("naming", sh, naming).expect("spawn");
        let mut other = Command::new(sh);
        other
            .args(["-c", LOOP, "sh"])
            .arg(format!("{}x/vmm.sock", dir.display()));
        let other = WatchedProcess::spawn("other", sh, other).expect("spawn");

        let killed = kill_naming_dir(&dir);
        // The shell's forked `sleep` child still carries the shell's argv until it
        // execs, so it may be killed too (rightly: it names the dir). The other shell
        // and its children never are.
        assert!(killed.contains(&naming.pid()), "{killed:?}");
        assert!(!killed.contains(&other.pid()), "{killed:?}");
        let exit = tokio::time::timeout(Duration::from_secs(5), naming.wait())
            .await
            .expect("killed");
        assert_eq!(exit.code, 128 + libc::SIGKILL);
        assert!(kill_naming_dir(Path::new("")).is_empty());
        assert_eq!(
            other.exited(),
            None,
            "a process naming another dir was killed"
        );
        other.stop(Duration::from_millis(100)).await;
    }

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
