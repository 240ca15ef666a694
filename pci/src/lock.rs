//! Per-device exclusive locks on the node.
//!
//! The operator's allocation is the source of truth for who owns a GPU; these
//! locks are defence in depth on the node itself, so two sandboxes can never
//! open one device even if the control plane errs. They are `flock(2)` locks:
//! the kernel drops them when the holder's file is closed, so a holder that dies
//! (even by SIGKILL) frees its devices with nothing to clean up.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{Error, PciAddress, Result};

/// Where device locks live on a production node.
pub const DEFAULT_LOCK_DIR: &str = "/run/gpuvm/devices";

/// An exclusive lock on one PCI function, held until dropped.
#[derive(Debug)]
pub struct DeviceLock {
    address: PciAddress,
    path: PathBuf,
    file: File,
}

impl DeviceLock {
    /// Takes the lock on `address` without waiting: `<lock_dir>/<address>.lock`.
    ///
    /// `holder` (a sandbox id, say) is written into the file with this process's
    /// pid, so that a refused caller can say who holds the device. Fails with
    /// [`Error::Busy`] when another open file holds the lock, even in this process.
    pub fn acquire(lock_dir: &Path, address: &PciAddress, holder: &str) -> Result<Self> {
        let path = lock_dir.join(format!("{address}.lock"));
        let lock_error = |source: io::Error| Error::Lock {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(lock_dir).map_err(lock_error)?;
        // Never truncate on open: the file may belong to the current holder.
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(lock_error)?;
        // SAFETY: `file` owns a valid open descriptor for the whole call, and flock
        // touches no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Busy {
                    address: *address,
                    holder: read_holder(&mut file),
                    path,
                });
            }
            return Err(lock_error(err));
        }
        let record = format!("pid={} holder={holder}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(record.as_bytes()))
            .map_err(lock_error)?;
        Ok(Self {
            address: *address,
            path,
            file,
        })
    }

    /// The locked function.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DeviceLock {
    fn drop(&mut self) {
        // Clear the holder record while still holding the lock, so the file never
        // names a holder that is gone; closing the file then releases the lock.
        // Best effort: a leftover record is harmless, only diagnostic.
        let _ = self.file.set_len(0);
    }
}

/// Locks on several functions (a GPU's whole IOMMU group), held until dropped.
#[derive(Debug)]
pub struct GroupLock {
    locks: Vec<DeviceLock>,
}

impl GroupLock {
    /// Locks every address, in sorted order so that two callers that want
    /// overlapping sets cannot deadlock or starve each other in a cycle. On the
    /// first busy device, the locks already taken are released and the error returned.
    pub fn acquire(lock_dir: &Path, addresses: &[PciAddress], holder: &str) -> Result<Self> {
        let mut sorted = addresses.to_vec();
        sorted.sort();
        sorted.dedup();
        let locks = sorted
            .iter()
            .map(|address| DeviceLock::acquire(lock_dir, address, holder))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { locks })
    }

    /// The locked functions, sorted.
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.locks.iter().map(DeviceLock::address).collect()
    }
}

fn read_holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) if !text.trim().is_empty() => text.trim().to_owned(),
        _ => "an unknown holder".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(text: &str) -> PciAddress {
        PciAddress::parse(text).unwrap()
    }

    #[test]
    fn second_acquire_is_busy_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join("run/gpuvm/devices");
        let gpu = bdf("0000:18:00.0");
        let held = DeviceLock::acquire(&locks, &gpu, "sandbox-a").unwrap();
        assert_eq!(held.path(), locks.join("0000:18:00.0.lock"));
        let record = fs::read_to_string(held.path()).unwrap();
        assert_eq!(
            record,
            format!("pid={} holder=sandbox-a\n", std::process::id())
        );

        let err = DeviceLock::acquire(&locks, &gpu, "sandbox-b").unwrap_err();
        let Error::Busy { holder, .. } = &err else {
            panic!("expected Busy, got {err:?}");
        };
        assert_eq!(
            holder,
            &format!("pid={} holder=sandbox-a", std::process::id())
        );
        assert!(
            err.to_string()
                .starts_with("0000:18:00.0 is busy: it is locked by pid=")
        );

        drop(held);
        assert_eq!(
            fs::read_to_string(locks.join("0000:18:00.0.lock")).unwrap(),
            ""
        );
        let again = DeviceLock::acquire(&locks, &gpu, "sandbox-b").unwrap();
        assert!(
            fs::read_to_string(again.path())
                .unwrap()
                .contains("holder=sandbox-b")
        );
    }

    #[test]
    fn group_lock_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let gpu = bdf("0000:01:00.0");
        let audio = bdf("0000:01:00.1");
        let other = bdf("0000:02:00.0");
        let taken = DeviceLock::acquire(dir.path(), &other, "sandbox-a").unwrap();

        let err = GroupLock::acquire(dir.path(), &[other, audio, gpu], "sandbox-b").unwrap_err();
        assert!(matches!(err, Error::Busy { address, .. } if address == other));
        // The functions sorted before the busy one were released again.
        DeviceLock::acquire(dir.path(), &gpu, "probe").unwrap();
        DeviceLock::acquire(dir.path(), &audio, "probe").unwrap();

        drop(taken);
        let group = GroupLock::acquire(dir.path(), &[audio, gpu, audio], "sandbox-b").unwrap();
        assert_eq!(group.addresses(), vec![gpu, audio]);
    }
}
