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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpuvm_protocol::agent::Resources;

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

/// One cgroup v2 interface file of a container's group and the value it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The file, e.g. `memory.max`.
    pub file: &'static str,
    /// What is written to it.
    pub value: String,
    /// A missing file is fine (no swap accounting in the kernel, and the value only
    /// disables or leaves swap unlimited), as runc allows.
    pub optional: bool,
}

impl Limit {
    fn new(file: &'static str, value: String) -> Self {
        Self {
            file,
            value,
            optional: false,
        }
    }
}

/// A memory value: bytes, `-1` for unlimited, `0` for unset (OCI's meanings).
fn memory_value(field: &str, value: Option<i64>) -> Result<Option<String>> {
    match value {
        None | Some(0) => Ok(None),
        Some(-1) => Ok(Some("max".into())),
        Some(n) if n > 0 => Ok(Some(n.to_string())),
        Some(n) => Err(Error::invalid(format!("the {field} {n} is negative"))),
    }
}

/// runc's `memory.swap.max` from OCI's memory+swap total (`ConvertMemorySwapToCgroupV2Value`).
fn swap_limit(memory: Option<i64>, swap: Option<i64>) -> Result<Option<Limit>> {
    let (memory, total) = (memory.unwrap_or(0), swap.unwrap_or(0));
    let value = match (memory, total) {
        // Unlimited memory and no swap given: both unlimited, as with cgroup v1.
        (-1, 0) => "max".to_owned(),
        (_, 0) => return Ok(None),
        (_, -1) => "max".to_owned(),
        (0 | -1, _) => {
            return Err(Error::invalid(
                "a memory+swap limit needs a memory limit".to_owned(),
            ));
        }
        (m, t) if m < 0 || t < 0 => {
            return Err(Error::invalid(format!(
                "the memory limit {m} or memory+swap limit {t} is negative"
            )));
        }
        (m, t) if t < m => {
            return Err(Error::invalid(format!(
                "the memory+swap limit {t} is below the memory limit {m}"
            )));
        }
        (m, t) => (t - m).to_string(),
    };
    Ok(Some(Limit {
        optional: value == "max" || value == "0",
        ..Limit::new("memory.swap.max", value)
    }))
}

/// cgroup v2 `cpu.weight` (1–10000) from OCI's `cpu.shares` (2–262144): the quadratic
/// fit of runc ≥ 1.3 / crun ≥ 1.23, which maps the shares' default 1024 onto the
/// weight's default 100; `0` is unset.
pub fn cpu_weight(shares: u64) -> u64 {
    match shares {
        0 => 0,
        1..=2 => 1,
        262_144.. => 10_000,
        _ => {
            let l = (shares as f64).log2();
            let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
            10f64.powf(exponent).ceil() as u64
        }
    }
}

/// The cgroup v2 files a container's OCI `linux.resources` set, converted as runc
/// converts them, in the order they are written.
pub fn limits(r: &Resources) -> Result<Vec<Limit>> {
    let mut out = Vec::new();
    if let Some(shares) = r.cpu_shares.filter(|s| *s != 0) {
        out.push(Limit::new("cpu.weight", cpu_weight(shares).to_string()));
    }
    let (quota, period) = (r.cpu_quota.unwrap_or(0), r.cpu_period.unwrap_or(0));
    if quota != 0 || period != 0 {
        let mut value = if quota > 0 {
            quota.to_string()
        } else {
            "max".to_owned()
        };
        if period != 0 {
            value.push_str(&format!(" {period}"));
        }
        out.push(Limit::new("cpu.max", value));
    }
    if let Some(low) = memory_value("memory reservation", r.memory_reservation)? {
        out.push(Limit::new("memory.low", low));
    }
    if let Some(max) = memory_value("memory limit", r.memory_limit)? {
        out.push(Limit::new("memory.max", max));
    }
    out.extend(swap_limit(r.memory_limit, r.memory_swap)?);
    if let Some(pids) = r.pids_limit {
        let value = if pids > 0 {
            pids.to_string()
        } else {
            "max".to_owned()
        };
        out.push(Limit::new("pids.max", value));
    }
    Ok(out)
}

/// The container groups under one cgroup2 mount.
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: PathBuf,
}

impl Cgroups {
    /// Enables the memory controller (and, where the kernel has them, cpu and pids)
    /// for `mount/gpuvm/*` and creates `mount/gpuvm`.
    pub fn setup(mount: &Path) -> Result<Self> {
        let parent = mount.join(CONTAINERS_GROUP);
        enable_controllers(mount)?;
        fs::create_dir_all(&parent)
            .map_err(|e| Error::io(format!("Creating the cgroup {}", parent.display()), e))?;
        enable_controllers(&parent)?;
        Ok(Self { parent })
    }

    /// Writes `limits` into a container's group `dir`. A file that is missing names
    /// the controller the guest kernel lacks.
    pub fn apply(&self, dir: &Path, limits: &[Limit]) -> Result<()> {
        for limit in limits {
            let path = dir.join(limit.file);
            let written = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(limit.value.as_bytes()));
            match written {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && limit.optional => {
                    tracing::debug!("{} is missing: {} not written", path.display(), limit.value);
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("Setting {} to {:?}", path.display(), limit.value),
                        e,
                    ));
                }
            }
        }
        Ok(())
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

/// Enables the memory controller (required: OOM detection needs it) and the cpu and
/// pids controllers (each only if the kernel has it; a container that asks for their
/// limits then fails with the missing file's name).
fn enable_controllers(group: &Path) -> Result<()> {
    let control = group.join("cgroup.subtree_control");
    fs::write(&control, "+memory").map_err(|e| {
        Error::io(
            format!("Enabling the memory controller in {}", control.display()),
            e,
        )
    })?;
    for controller in ["cpu", "pids"] {
        if let Err(e) = fs::write(&control, format!("+{controller}")) {
            tracing::warn!(
                "Cannot enable the {controller} controller in {}: {e}",
                control.display()
            );
        }
    }
    Ok(())
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

    fn resources(
        memory: Option<i64>,
        swap: Option<i64>,
        shares: Option<u64>,
        quota: Option<i64>,
        period: Option<u64>,
        pids: Option<i64>,
    ) -> Resources {
        Resources {
            memory_limit: memory,
            memory_swap: swap,
            cpu_shares: shares,
            cpu_quota: quota,
            cpu_period: period,
            pids_limit: pids,
            ..Default::default()
        }
    }

    fn files(limits: &[Limit]) -> Vec<(&'static str, &str, bool)> {
        limits
            .iter()
            .map(|l| (l.file, l.value.as_str(), l.optional))
            .collect()
    }

    #[test]
    fn oci_resources_become_cgroup_v2_files_as_runc_writes_them() {
        let cases = [
            (resources(None, None, None, None, None, None), vec![]),
            (
                // A Kubernetes container limited to 64Mi and 500m: kubelet's values
                // (swap = limit: no swap), containerd passes them as they are.
                resources(
                    Some(64 << 20),
                    Some(64 << 20),
                    Some(512),
                    Some(50_000),
                    Some(100_000),
                    None,
                ),
                vec![
                    ("cpu.weight", "59", false),
                    ("cpu.max", "50000 100000", false),
                    ("memory.max", "67108864", false),
                    ("memory.swap.max", "0", true),
                ],
            ),
            (
                resources(
                    Some(100),
                    Some(300),
                    Some(1024),
                    Some(-1),
                    Some(250_000),
                    Some(42),
                ),
                vec![
                    ("cpu.weight", "100", false),
                    ("cpu.max", "max 250000", false),
                    ("memory.max", "100", false),
                    ("memory.swap.max", "200", false),
                    ("pids.max", "42", false),
                ],
            ),
            (
                resources(Some(-1), None, Some(2), Some(20_000), None, Some(-1)),
                vec![
                    ("cpu.weight", "1", false),
                    ("cpu.max", "20000", false),
                    ("memory.max", "max", false),
                    ("memory.swap.max", "max", true),
                    ("pids.max", "max", false),
                ],
            ),
            (
                resources(Some(100), Some(-1), Some(262_144), None, None, Some(0)),
                vec![
                    ("cpu.weight", "10000", false),
                    ("memory.max", "100", false),
                    ("memory.swap.max", "max", true),
                    ("pids.max", "max", false),
                ],
            ),
        ];
        for (r, want) in cases {
            assert_eq!(files(&limits(&r).unwrap()), want, "{r:?}");
        }
        let reserved = Resources {
            memory_reservation: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(
            files(&limits(&reserved).unwrap()),
            vec![("memory.low", "1048576", false)]
        );
    }

    #[test]
    fn impossible_memory_limits_are_refused() {
        let cases = [
            (
                resources(None, Some(100), None, None, None, None),
                "needs a memory limit",
            ),
            (
                resources(Some(-1), Some(100), None, None, None, None),
                "needs a memory limit",
            ),
            (
                resources(Some(200), Some(100), None, None, None, None),
                "below the memory limit",
            ),
            (
                resources(Some(-5), None, None, None, None, None),
                "is negative",
            ),
            (
                resources(Some(100), Some(-7), None, None, None, None),
                "is negative",
            ),
        ];
        for (r, want) in cases {
            let err = limits(&r).unwrap_err().to_string();
            assert!(err.contains(want), "{r:?}: {err}");
        }
    }

    #[test]
    fn cpu_weight_follows_runc_and_crun() {
        // The fit's ends and default are exact (2 → 1, 1024 → 100, 262144 → 10000).
        let cases = [
            (0, 0),
            (1, 1),
            (2, 1),
            (3, 2),
            (512, 59),
            (1024, 100),
            (2048, 174),
            (4096, 303),
            (100_000, 4340),
            (262_143, 10_000),
            (262_144, 10_000),
            (1 << 20, 10_000),
        ];
        for (shares, weight) in cases {
            assert_eq!(cpu_weight(shares), weight, "{shares}");
        }
    }

    #[test]
    fn limits_are_written_into_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        fs::create_dir_all(root.path().join("gpuvm")).unwrap();
        fs::write(root.path().join("gpuvm/cgroup.subtree_control"), "").unwrap();
        let cgroups = Cgroups::setup(root.path()).unwrap();
        let dir = cgroups.create("c1").unwrap();
        for file in ["cpu.max", "memory.max"] {
            fs::write(dir.join(file), "").unwrap();
        }
        let r = resources(Some(1 << 30), Some(1 << 30), None, Some(50_000), None, None);
        cgroups.apply(&dir, &limits(&r).unwrap()).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "50000");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).unwrap(),
            "1073741824"
        );
        // memory.swap.max is missing (no swap accounting): "0" is skipped, as runc does.
        assert!(!dir.join("memory.swap.max").exists());
        // A missing controller's file is named.
        let err = cgroups
            .apply(&dir, &[Limit::new("pids.max", "10".into())])
            .unwrap_err();
        assert!(err.to_string().contains("pids.max"), "{err}");
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
