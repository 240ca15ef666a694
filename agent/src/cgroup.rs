//! One cgroup v2 group per container, and OOM-kill detection.
//!
//! In the guest the agent enables the memory controller and gives each container
//! `/sys/fs/cgroup/gpuvm/<container id>`; its processes (execs included) join it
//! before exec. The kernel counts OOM kills per cgroup in `memory.events`
//! (`oom_kill`), for cgroup-limit and guest-wide OOMs alike, and raises the counter
//! before it sends the SIGKILL, so the counter is current when the reaper collects
//! the victim. Without cgroups (the agent as an ordinary process on a host) the
//! guest-wide `oom_kill` of `/proc/vmstat` is used instead.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where the agent's container groups live under the cgroup2 mount.
pub const CONTAINERS_GROUP: &str = "gpuvm";

/// Where a process's OOM kills are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OomCounter {
    /// `memory.events` of the container's cgroup: kills inside the container.
    Cgroup(PathBuf),
    /// `/proc/vmstat`: kills anywhere in the guest.
    Guest,
}

impl OomCounter {
    /// The counter for a container cgroup, or the guest-wide one when the cgroup
    /// has no memory controller.
    pub fn for_cgroup(cgroup: Option<&Path>) -> Self {
        match cgroup.map(|dir| dir.join("memory.events")) {
            Some(events) if events.is_file() => Self::Cgroup(events),
            _ => Self::Guest,
        }
    }

    /// The current number of OOM kills, if it can be read.
    pub fn read(&self) -> Option<u64> {
        let path = match self {
            Self::Cgroup(events) => events.as_path(),
            Self::Guest => Path::new("/proc/vmstat"),
        };
        parse_oom_kill(&fs::read_to_string(path).ok()?)
    }
}

/// The `oom_kill <n>` line of `/proc/vmstat` or of a cgroup's `memory.events`.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "oom_kill")
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// Whether a process was OOM-killed.
///
/// The OOM counter must have risen while it ran. Then either it died of SIGKILL, or
/// it is a container's init process and the counter is its container's own: a
/// container counts as OOM-killed when any of its processes was (what CRI reports as
/// `OOMKilled`), e.g. a shell whose child the kernel killed.
pub fn was_oom_killed(
    before: Option<u64>,
    after: Option<u64>,
    signal: u32,
    init_of_container_cgroup: bool,
) -> bool {
    let rose = matches!((before, after), (Some(b), Some(a)) if a > b);
    rose && (signal == libc::SIGKILL as u32 || init_of_container_cgroup)
}

/// The container groups under one cgroup2 mount.
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: PathBuf,
}

impl Cgroups {
    /// Enables the memory controller for `mount/gpuvm/*` and creates `mount/gpuvm`.
    pub fn setup(mount: &Path) -> Result<Self> {
        let parent = mount.join(CONTAINERS_GROUP);
        enable_memory_controller(mount)?;
        fs::create_dir_all(&parent)
            .map_err(|e| Error::io(format!("Creating the cgroup {}", parent.display()), e))?;
        enable_memory_controller(&parent)?;
        Ok(Self { parent })
    }

    /// Creates the group of a container and returns its directory.
    pub fn create(&self, container_id: &str) -> Result<PathBuf> {
        let dir = self.parent.join(container_id);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(Error::io(
                format!("Creating the cgroup {}", dir.display()),
                e,
            )),
        }
    }

    /// Kills what is left in a container's group and removes it.
    pub fn remove(&self, dir: &Path) -> Result<()> {
        // cgroup.kill (Linux 5.14) SIGKILLs every process in the group at once.
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        // Killed processes leave the group a moment after the signal.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::io(
                        format!("Removing the cgroup {}", dir.display()),
                        e,
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

fn enable_memory_controller(group: &Path) -> Result<()> {
    let control = group.join("cgroup.subtree_control");
    fs::write(&control, "+memory").map_err(|e| {
        Error::io(
            format!("Enabling the memory controller in {}", control.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counters_parse() {
        let vmstat = "pgfault 100\noom_kill 3\nnr_free_pages 5\n";
        assert_eq!(parse_oom_kill(vmstat), Some(3));
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(events), Some(1));
        assert_eq!(parse_oom_kill("oom 2\n"), None);
    }

    #[test]
    fn oom_killed_needs_a_rising_counter_and_a_kill() {
        let sigkill = libc::SIGKILL as u32;
        let cases = [
            // before, after, signal, init of a container cgroup, expected
            (Some(0), Some(1), sigkill, false, true),
            (Some(0), Some(1), 0, false, false),
            (Some(0), Some(1), libc::SIGTERM as u32, false, false),
            (Some(0), Some(1), 0, true, true),
            (Some(1), Some(1), sigkill, true, false),
            (None, Some(1), sigkill, false, false),
            (Some(1), None, sigkill, false, false),
        ];
        for (before, after, signal, init, expected) in cases {
            assert_eq!(
                was_oom_killed(before, after, signal, init),
                expected,
                "{before:?} {after:?} {signal} {init}"
            );
        }
    }

    #[test]
    fn counter_falls_back_to_the_guest() {
        assert_eq!(OomCounter::for_cgroup(None), OomCounter::Guest);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(OomCounter::for_cgroup(Some(dir.path())), OomCounter::Guest);
        fs::write(dir.path().join("memory.events"), "oom_kill 4\n").unwrap();
        let counter = OomCounter::for_cgroup(Some(dir.path()));
        assert_eq!(counter.read(), Some(4));
    }
}
