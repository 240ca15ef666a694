//! Readers for the few `/proc` files the agent reports from. Parsers are pure.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PidStat {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// User CPU time in clock ticks.
    pub utime_ticks: u64,
    /// System CPU time in clock ticks.
    pub stime_ticks: u64,
    /// Number of threads.
    pub threads: u32,
    /// Virtual memory size in bytes.
    pub vsize_bytes: u64,
    /// Resident set in pages.
    pub rss_pages: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name may contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_pid_stat(line: &str) -> Option<PidStat> {
    let (head, tail) = line.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    // tail fields start at field 3 (state).
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).copied();
    Some(PidStat {
        pid,
        ppid: field(4)?.parse().ok()?,
        utime_ticks: field(14)?.parse().ok()?,
        stime_ticks: field(15)?.parse().ok()?,
        threads: field(20)?.parse().ok()?,
        vsize_bytes: field(23)?.parse().ok()?,
        rss_pages: field(24)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat` of every live process.
pub fn all_pid_stats(proc_root: &Path) -> Vec<PidStat> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|line| parse_pid_stat(&line))
        .collect()
}

/// The given roots plus every live descendant of them, sorted.
pub fn descendants(stats: &[PidStat], roots: &[u32]) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for stat in stats {
        children.entry(stat.ppid).or_default().push(stat.pid);
    }
    let live: BTreeSet<u32> = stats.iter().map(|s| s.pid).collect();
    let mut found = BTreeSet::new();
    let mut queue: Vec<u32> = roots.iter().copied().filter(|p| live.contains(p)).collect();
    while let Some(pid) = queue.pop() {
        if found.insert(pid) {
            queue.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    found
}

/// Every process but PID 1 and the kernel's threads (kthreadd, pid 2, and its
/// children), sorted: what must be gone before the guest powers off.
pub fn user_pids(stats: &[PidStat]) -> Vec<u32> {
    let mut pids: Vec<u32> = stats
        .iter()
        .filter(|s| s.pid > 2 && s.ppid != 2)
        .map(|s| s.pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// Finds a `Key:   <number> kB` line of `/proc/meminfo` or `/proc/<pid>/status`,
/// in bytes.
pub fn parse_kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// Parses `/proc/uptime` into nanoseconds.
pub fn parse_uptime_ns(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    // Truncation to whole nanoseconds is intended.
    Some((seconds * 1e9) as u64)
}

/// Parses the 1-minute load average from `/proc/loadavg`.
pub fn parse_load1(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Reads a `/proc` file, empty when it cannot be read.
pub fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                        7 3 0 0 20 0 2 0 123 10485760 256 18446744073709551615";

    #[test]
    fn pid_stat_counts_fields_after_the_last_paren() {
        let stat = parse_pid_stat(STAT).unwrap();
        assert_eq!(
            stat,
            PidStat {
                pid: 4242,
                ppid: 1,
                utime_ticks: 7,
                stime_ticks: 3,
                threads: 2,
                vsize_bytes: 10_485_760,
                rss_pages: 256,
            }
        );
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    #[test]
    fn descendants_walk_the_tree() {
        let stat = |pid, ppid| PidStat {
            pid,
            ppid,
            ..Default::default()
        };
        let stats = [
            stat(1, 0),
            stat(10, 1),
            stat(11, 10),
            stat(12, 11),
            stat(20, 1),
        ];
        assert_eq!(
            descendants(&stats, &[10]).into_iter().collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert!(descendants(&stats, &[99]).is_empty());
    }

    #[test]
    fn user_pids_leave_out_init_and_kernel_threads() {
        let stat = |pid, ppid| PidStat {
            pid,
            ppid,
            ..Default::default()
        };
        let stats = [
            stat(1, 0),
            stat(2, 0),
            stat(3, 2),
            stat(40, 1),
            stat(41, 40),
        ];
        assert_eq!(user_pids(&stats), vec![40, 41]);
    }

    #[test]
    fn small_parsers() {
        let meminfo = "MemTotal:        2014256 kB\nMemFree: 1 kB\nMemAvailable:    1800000 kB\n";
        assert_eq!(parse_kib_field(meminfo, "MemTotal"), Some(2_014_256 * 1024));
        assert_eq!(
            parse_kib_field(meminfo, "MemAvailable"),
            Some(1_800_000 * 1024)
        );
        assert_eq!(parse_kib_field(meminfo, "Mem"), None);
        assert_eq!(parse_uptime_ns("12.50 20.00\n"), Some(12_500_000_000));
        assert_eq!(parse_load1("0.25 0.10 0.05 1/80 123\n"), Some(0.25));
    }

    #[test]
    fn reads_this_process() {
        let stats = all_pid_stats(Path::new("/proc"));
        assert!(stats.iter().any(|s| s.pid == std::process::id()));
    }
}
