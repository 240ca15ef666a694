//! State that must survive a shim crash, written in the sandbox's bundle directory:
//! what `shim delete` needs to clean up (helper pids, the VM's work dir, rootfs mounts).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::DeviceRecord;
use crate::error::{Error, Result};
use crate::hypervisor::VmRecord;
use crate::network::NetworkRecord;

/// File name of the state file inside the bundle.
pub const STATE_FILE: &str = "gpuvm-state.json";

/// How long `shim delete` waits for the processes it killed to be gone.
const KILLED_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The persisted state of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id.
    pub sandbox_id: String,
    /// The VM's processes and work dir.
    pub vm: VmRecord,
    /// Host mounts made for the sandbox (container rootfs mounts, then the shared dir's
    /// own bind mount), unmounted in this order on cleanup.
    pub mounts: Vec<PathBuf>,
    /// Where the sandbox's start time went; the benchmark reads it while the pod runs.
    #[serde(default)]
    pub timings: StartTimings,
    /// The VFIO devices passed to the VM and the host paths of their reset, so that
    /// `shim delete` resets them after a killed shim before they can be locked again.
    #[serde(default)]
    pub devices: Option<DeviceRecord>,
    /// The pod cgroup directories the shim created (parents first, one set per
    /// hierarchy), removed with `rmdir` once the VM's processes are gone.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The taps and tc qdiscs the shim added to the pod's network namespace.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
}

/// The sandbox start broken down, in milliseconds. Each phase ends where the next
/// begins, so the sum is the time from the sandbox's Create to its first container
/// running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimings {
    /// The shim's own work: config, guest sizing, state file, mounts, bookkeeping.
    pub shim_ms: u64,
    /// Starting the VMM and its helpers (virtiofsd, vhost-device-vsock).
    pub vmm_ms: u64,
    /// VMM started → the agent accepts a vsock connection (kernel boot, module load).
    pub boot_ms: u64,
    /// Connected → the agent answered its first request.
    pub agent_ms: u64,
    /// The first app container's create and start in the guest (0 for a pod sandbox
    /// until its first container starts).
    pub container_ms: u64,
}

impl StartTimings {
    /// Milliseconds between two instants, saturating.
    pub fn millis(from: std::time::Instant, to: std::time::Instant) -> u64 {
        u64::try_from(to.saturating_duration_since(from).as_millis()).unwrap_or(u64::MAX)
    }
}

impl SandboxRecord {
    /// Writes the record atomically (temp file + rename) into `bundle`.
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(STATE_FILE);
        let tmp = bundle.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            context: "cannot encode the state file".into(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, text).map_err(Error::io(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(Error::io(format!(
            "cannot rename {} into place",
            tmp.display()
        )))
    }

    /// Reads the record from `bundle`; `None` if there is none.
    pub fn load(bundle: &Path) -> Result<Option<SandboxRecord>> {
        let path = bundle.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Io {
                    context: format!("state file {} is corrupt", path.display()),
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                context: format!("cannot read {}", path.display()),
                source,
            }),
        }
    }

    /// Removes the state file from `bundle` (missing is fine).
    pub fn remove(bundle: &Path) {
        let _ = std::fs::remove_file(bundle.join(STATE_FILE));
    }

    /// Cleans up after a crashed shim: kills the recorded processes (only if their pid
    /// still runs the recorded binary) and any process naming the VM's work dir, waits
    /// until they are gone (the VMM holds the devices open until it is), unmounts the
    /// rootfs mounts, removes the taps and tc redirects from the pod's network namespace,
    /// removes the VM's work dir, and resets the devices before their
    /// locks can be taken again ([`crate::devices::reset_after_crash`]). Best effort
    /// and idempotent.
    pub fn clean_up(&self) {
        let mut killed = Vec::new();
        for process in self.vm.processes.iter().rev() {
            if crate::process::kill_recorded(process.pid, &process.binary) {
                tracing::info!(name = %process.name, pid = process.pid, "killed leftover process");
                killed.push(process.pid);
            }
        }
        // A helper spawned just before a crash may be missing from the record: every
        // helper names the VM's work dir in its arguments (sockets, logs, share).
        for pid in crate::process::kill_naming_dir(&self.vm.work_dir) {
            tracing::info!(pid, "killed leftover process naming the VM's work dir");
            killed.push(pid);
        }
        let left = crate::process::wait_gone(&killed, KILLED_EXIT_WAIT);
        if !left.is_empty() {
            tracing::error!(pids = ?left, "killed processes still run");
        }
        // The VMM is gone (it held the taps open): remove them and the redirects.
        if let Some(network) = &self.network {
            network.detach();
        }
        for mount in &self.mounts {
            crate::rootfs::unmount(mount);
        }
        crate::cgroup::remove_created(&self.cgroups);
        if !self.vm.work_dir.as_os_str().is_empty() {
            crate::rootfs::remove_dir_if_unmounted(&self.vm.work_dir);
        }
        if let Some(devices) = &self.devices {
            if !left.is_empty() {
                // A VMM that still runs may still use the devices: resetting them under
                // it helps nobody; their markers keep them out until a later delete.
                tracing::error!(devices = ?devices.devices, "devices not reset: the VM's processes still run");
                return;
            }
            let outcome = crate::devices::reset_after_crash(devices, &self.sandbox_id);
            tracing::info!(reset = ?outcome.reset, failed = ?outcome.failed, "devices reset after the killed shim");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::RecordedProcess;

    #[test]
    fn round_trip_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SandboxRecord::load(dir.path()).expect("load"), None);
        let record = SandboxRecord {
            sandbox_id: "s1".into(),
            vm: VmRecord {
                processes: vec![RecordedProcess {
                    name: "qemu".into(),
                    pid: 42,
                    binary: "/usr/bin/qemu-system-x86_64".into(),
                }],
                work_dir: "/run/gpuvm/s1".into(),
            },
            mounts: vec!["/run/gpuvm/s1/shared/c1/rootfs".into()],
            timings: StartTimings {
                shim_ms: 3,
                vmm_ms: 200,
                boot_ms: 4000,
                agent_ms: 2,
                container_ms: 5,
            },
            devices: Some(DeviceRecord {
                devices: vec![gpuvm_pci::testing::bdf("0000:18:00.0")],
                sysfs_root: "/sys".into(),
                lock_dir: "/run/gpuvm/devices".into(),
                health_dir: "/run/gpuvm/health".into(),
            }),
            cgroups: vec!["/sys/fs/cgroup/kubepods/pod1".into()],
            network: Some(NetworkRecord {
                netns: "/var/run/netns/cni-1".into(),
                taps: vec!["tap0_gpuvm".into()],
                links: vec!["eth0".into()],
            }),
        };
        record.save(dir.path()).expect("save");
        assert_eq!(SandboxRecord::load(dir.path()).expect("load"), Some(record));
        SandboxRecord::remove(dir.path());
        assert_eq!(SandboxRecord::load(dir.path()).expect("load"), None);
    }

    #[tokio::test]
    async fn clean_up_kills_recorded_processes_and_removes_the_work_dir() {
        let work = tempfile::tempdir().expect("tempdir");
        let work_dir = work.path().join("vm");
        std::fs::create_dir(&work_dir).expect("mkdir");
        let sleep = Path::new("/bin/sleep");
        let mut cmd = tokio::process::Command::new(sleep);
        cmd.arg("60");
        let child = crate::process::WatchedProcess::spawn("sleep", sleep, cmd).expect("spawn");
        let record = SandboxRecord {
            sandbox_id: "s1".into(),
            vm: VmRecord {
                processes: vec![RecordedProcess {
                    name: "sleep".into(),
                    pid: child.pid(),
                    binary: sleep.to_owned(),
                }],
                work_dir: work_dir.clone(),
            },
            ..SandboxRecord::default()
        };
        record.clean_up();
        let exit = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
            .await
            .expect("killed");
        assert_eq!(exit.code, 128 + libc::SIGKILL);
        assert!(!work_dir.exists());
    }

    #[test]
    fn a_state_file_without_timings_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"sandbox_id":"s1","vm":{"processes":[],"work_dir":"/run/gpuvm/s1"},"mounts":[]}"#,
        )
        .expect("write");
        let record = SandboxRecord::load(dir.path())
            .expect("load")
            .expect("some");
        assert_eq!(record.timings, StartTimings::default());
    }

    #[test]
    fn clean_up_spares_a_reused_pid() {
        // Our own pid runs the test binary, not /bin/sleep: it must not be killed.
        let record = SandboxRecord {
            vm: VmRecord {
                processes: vec![RecordedProcess {
                    name: "qemu".into(),
                    pid: std::process::id(),
                    binary: "/bin/sleep".into(),
                }],
                work_dir: PathBuf::new(),
            },
            ..SandboxRecord::default()
        };
        record.clean_up();
    }
}
