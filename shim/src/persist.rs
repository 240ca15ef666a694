//! State that must survive a shim crash, written in the sandbox's bundle directory:
//! what `shim delete` needs to clean up (helper pids, the VM's work dir, rootfs mounts).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hypervisor::VmRecord;

/// File name of the state file inside the bundle.
pub const STATE_FILE: &str = "gpuvm-state.json";

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
    /// still runs the recorded binary), unmounts the rootfs mounts and removes the
    /// VM's work dir. Best effort and idempotent.
    pub fn clean_up(&self) {
        for process in self.vm.processes.iter().rev() {
            if crate::process::kill_recorded(process.pid, &process.binary) {
                tracing::info!(name = %process.name, pid = process.pid, "killed leftover process");
            }
        }
        for mount in &self.mounts {
            crate::rootfs::unmount(mount);
        }
        if !self.vm.work_dir.as_os_str().is_empty() {
            crate::rootfs::remove_dir_if_unmounted(&self.vm.work_dir);
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
            mounts: vec![],
        };
        record.clean_up();
        let exit = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
            .await
            .expect("killed");
        assert_eq!(exit.code, 128 + libc::SIGKILL);
        assert!(!work_dir.exists());
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
