//! NUMA placement: on a host with more than one NUMA node, the VM's processes run on
//! the CPUs of its GPUs' node and allocate from that node's memory only (guest RAM
//! included), so DMA between the GPUs and guest memory never crosses the socket
//! interconnect. Set for each process between fork and exec (`sched_setaffinity`,
//! `set_mempolicy(MPOL_BIND)`; both survive exec and are inherited by the VMM's
//! threads), the same way for QEMU and Cloud Hypervisor.
//!
//! [`placement`] decides from a sysfs root (`/sys`, or a fake tree in tests).

use std::path::Path;

use crate::error::{Error, Result};

/// The host node a VM is placed on, with its CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaPlacement {
    /// The NUMA node of the VM's GPUs.
    pub node: u32,
    /// That node's CPUs.
    pub cpus: Vec<u32>,
}

/// The highest CPU and node number a placement may name (the kernel's usual
/// `NR_CPUS` / `MAX_NUMNODES` ceilings).
const MAX_CPU: u32 = 8191;
const MAX_NODE: u32 = 1023;

/// A kernel list (`0-3,8,10-11`), sorted as written; empty for an empty text.
pub fn parse_list(text: &str, max: u32) -> Result<Vec<u32>> {
    let bad = || Error::VmConfig(format!("{text:?} is not a CPU or node list"));
    let mut out = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let first: u32 = first.parse().map_err(|_| bad())?;
        let last: u32 = last.parse().map_err(|_| bad())?;
        if first > last || last > max {
            return Err(bad());
        }
        out.extend(first..=last);
    }
    Ok(out)
}

/// Where the VM goes: on the node all of `gpu_nodes` (the passed GPUs' `numa_node`)
/// share, when the host (`<sysfs_root>/devices/system/node/online`) has more than one
/// node. `None` without GPUs, on a single-node host, or when the GPUs' nodes are
/// unknown or differ (logged: the scheduler places multi-GPU VMs on one node).
pub fn placement(sysfs_root: &Path, gpu_nodes: &[Option<u32>]) -> Result<Option<NumaPlacement>> {
    let Some(first) = gpu_nodes.first() else {
        return Ok(None);
    };
    let nodes_dir = sysfs_root.join("devices/system/node");
    let online = match std::fs::read_to_string(nodes_dir.join("online")) {
        Ok(text) => parse_list(&text, MAX_NODE)?,
        // No NUMA support in the kernel: one node.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("cannot read the host's NUMA nodes".to_owned())(e)),
    };
    if online.len() < 2 {
        return Ok(None);
    }
    let node = match first {
        Some(node) if gpu_nodes.iter().all(|n| n == &Some(*node)) => *node,
        _ => {
            tracing::warn!(nodes = ?gpu_nodes, "the GPUs are on different or unknown NUMA nodes: the VM is not placed");
            return Ok(None);
        }
    };
    let cpulist = nodes_dir.join(format!("node{node}/cpulist"));
    let text = std::fs::read_to_string(&cpulist)
        .map_err(Error::io(format!("cannot read {}", cpulist.display())))?;
    let cpus = parse_list(&text, MAX_CPU)?;
    if !online.contains(&node) || cpus.is_empty() {
        tracing::warn!(
            node,
            "the GPUs' NUMA node is offline or has no CPUs: the VM is not placed"
        );
        return Ok(None);
    }
    Ok(Some(NumaPlacement { node, cpus }))
}

/// `MPOL_BIND` of `set_mempolicy(2)`.
const MPOL_BIND: libc::c_long = 2;

/// Makes `command`'s child run on `placement`'s CPUs and allocate from its node only,
/// set between fork and exec.
pub fn bind_before_exec(placement: &NumaPlacement, command: &mut tokio::process::Command) {
    // Built here: the child must not allocate.
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let set_size = libc::CPU_SETSIZE as usize;
    let in_set: Vec<usize> = placement
        .cpus
        .iter()
        .map(|c| *c as usize)
        .filter(|c| *c < set_size)
        .collect();
    for cpu in &in_set {
        // SAFETY: CPU_SET sets one bit of the set; `cpu` is below its size.
        unsafe { libc::CPU_SET(*cpu, &mut cpus) };
    }
    // A node whose CPUs are all past the set's size keeps the memory binding only.
    let bind_cpus = !in_set.is_empty();
    let mut nodemask = [0u64; (MAX_NODE as usize + 1) / 64];
    let node = placement.node as usize;
    nodemask[node / 64] |= 1 << (node % 64);
    let bind = move || {
        // SAFETY: both calls only read the sets built before the fork, which live in
        // this closure; both are plain system calls (async-signal-safe).
        unsafe {
            if bind_cpus
                && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &cpus) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let maxnode = (nodemask.len() * 64) as libc::c_ulong;
            if libc::syscall(
                libc::SYS_set_mempolicy,
                MPOL_BIND,
                nodemask.as_ptr(),
                maxnode,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes the two system calls above, allocating nothing.
    unsafe {
        command.pre_exec(bind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lists_parse() {
        assert_eq!(
            parse_list("0-3,8,10-11\n", MAX_CPU).expect("list"),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_list("\n", MAX_CPU).expect("empty"), Vec::<u32>::new());
        for bad in ["a", "3-1", "1-", "-1", "0-9000", "1,,x"] {
            assert!(parse_list(bad, MAX_CPU).is_err(), "{bad}");
        }
    }

    /// A fake sysfs with `online` nodes, each node `n` holding `cpus[n]`.
    fn fake_nodes(online: &str, cpus: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let nodes = root.path().join("devices/system/node");
        std::fs::create_dir_all(&nodes).expect("mkdir");
        std::fs::write(nodes.join("online"), format!("{online}\n")).expect("write");
        for (n, list) in cpus.iter().enumerate() {
            std::fs::create_dir_all(nodes.join(format!("node{n}"))).expect("mkdir");
            std::fs::write(nodes.join(format!("node{n}/cpulist")), format!("{list}\n"))
                .expect("write");
        }
        root
    }

    /// A case: sysfs root, the GPUs' nodes, the expected (node, CPUs).
    type Case<'a> = (&'a Path, &'a [Option<u32>], Option<(u32, Vec<u32>)>);

    #[test]
    fn the_vm_goes_to_its_gpus_node_on_a_multi_node_host() {
        let two = fake_nodes("0-1", &["0-3,8-11", "4-7,12-15"]);
        let one = fake_nodes("0", &["0-15"]);
        let cases: [Case<'_>; 7] = [
            (
                two.path(),
                &[Some(1)],
                Some((1, vec![4, 5, 6, 7, 12, 13, 14, 15])),
            ),
            (
                two.path(),
                &[Some(0), Some(0)],
                Some((0, vec![0, 1, 2, 3, 8, 9, 10, 11])),
            ),
            // GPUs split across nodes, or with no node: no placement.
            (two.path(), &[Some(0), Some(1)], None),
            (two.path(), &[None], None),
            // No GPUs; a single-node host; a kernel without NUMA.
            (two.path(), &[], None),
            (one.path(), &[Some(0)], None),
            (Path::new("/nonexistent"), &[Some(0)], None),
        ];
        for (root, gpus, want) in cases {
            let got = placement(root, gpus).expect("placement");
            let want = want.map(|(node, cpus)| NumaPlacement { node, cpus });
            assert_eq!(got, want, "{} {gpus:?}", root.display());
        }
        // A node the kernel lists as online but without a cpulist is an error.
        let broken = fake_nodes("0-2", &["0", "1"]);
        let err = placement(broken.path(), &[Some(2)]).expect_err("no node2");
        assert!(err.to_string().contains("node2/cpulist"), "{err}");
    }

    #[tokio::test]
    async fn a_child_runs_bound_to_the_node() {
        // Node 0 and CPU 0 exist on every Linux host.
        let placement = NumaPlacement {
            node: 0,
            cpus: vec![0],
        };
        let mut command = tokio::process::Command::new("/bin/grep");
        command.args(["-E", "^(Cpus|Mems)_allowed_list", "/proc/self/status"]);
        bind_before_exec(&placement, &mut command);
        let out = command.output().await.expect("spawn");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Cpus_allowed_list:\t0\n"), "{text}");
    }
}
