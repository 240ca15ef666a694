//! Child processes that are killed (SIGKILL, by PID) and reaped when dropped, panics
//! included, with their output in a log file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::Context as _;

/// A running child process and its log.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `command` with stdin closed and stdout + stderr appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(ChildProcess {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The process name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the process has ended (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process with SIGKILL and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either it is running and gets killed, or it already exited: both are fine.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The CPU time it has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid()?)
    }

    /// The path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// An error context: name, exit status when ended, and the log's tail.
    pub fn describe(&mut self) -> String {
        let state = match self.exited() {
            Some(status) => format!("exited with {status}"),
            None => "running".to_owned(),
        };
        format!(
            "{} ({state}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            self.log_tail(40)
        )
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a text file (empty when unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The CPU time (user + system) process `pid` has used, in seconds, from `/proc/<pid>/stat`
/// (in clock ticks of 1/100 s, Linux's `USER_HZ` on every architecture it runs on).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_on_drop_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut p = ChildProcess::spawn(
            "sleeper",
            Command::new("sh").args(["-c", "echo one; echo two >&2; exec sleep 60"]),
            &log,
        )
        .unwrap();
        let pid = p.pid().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        // Give the shell a moment to write.
        for _ in 0..50 {
            if p.log_tail(5).contains("two") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(p.log_tail(1), "two");
        assert!(p.exited().is_none());
        assert!(p.describe().contains("sleeper (running)"));
        drop(p);
        // Reaped: no zombie left under that pid (it may be reused, but not this soon).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn exit_status_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = ChildProcess::spawn(
            "false",
            &mut Command::new("false"),
            &dir.path().join("f.log"),
        )
        .unwrap();
        let mut status = None;
        for _ in 0..100 {
            status = p.exited();
            if status.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!status.unwrap().success());
        assert!(p.describe().contains("exited with"));
    }
}
