//! Host paths inside directories the guest can write (the virtio-fs share and the
//! container rootfs directories under it), resolved without following symlinks.
//!
//! The guest writes the share through virtiofsd, so it can plant a symlink anywhere
//! in it (to `/`, to `/etc`, a loop) and swap a directory for one between two calls
//! of the shim. Every path the shim creates, mounts on, unmounts or removes there is
//! therefore opened with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (a
//! symlink in any component is `ELOOP`) and then used through its file descriptor:
//! a mount goes onto `/proc/self/fd/<dir>`, an unmount names one component inside
//! an opened parent (`/proc/self/fd/<parent>/<name>` with `UMOUNT_NOFOLLOW`), and a
//! removal is `unlinkat` in an opened parent. Nothing is looked up by name twice.
//!
//! The whole path must be free of symlinks, the host's part included: the shim's
//! run directory (`/run/gpuvm`) is a plain directory.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use crate::error::{Error, Result};

/// Resolution that refuses every symlink (and every `/proc` magic link) on the way.
fn no_symlinks() -> ResolveFlags {
    ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn refused(path: &Path, what: &str, errno: Errno) -> Error {
    let context = if errno == Errno::LOOP {
        format!(
            "refusing to {what} {}: a component of the path is a symlink (the guest can write there)",
            path.display()
        )
    } else {
        format!("cannot {what} {}", path.display())
    };
    Error::Io {
        context,
        source: errno.into(),
    }
}

/// Opens `path` (absolute) as an `O_PATH` descriptor, refusing any symlink in it.
pub fn open_no_symlinks(path: &Path) -> std::result::Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        CWD,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        no_symlinks(),
    )
}

/// The parent directory of `path`, opened without symlinks, and the last component.
fn open_parent(path: &Path) -> std::result::Result<(OwnedFd, &OsStr), Errno> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Errno::INVAL);
    };
    let dir = rustix::fs::openat2(
        CWD,
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        no_symlinks(),
    )?;
    Ok((dir, name))
}

/// `/proc/self/fd/<fd>`: the object `fd` holds, for calls that only take paths.
fn proc_fd(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Creates `path` (absolute) and its missing parents as directories, one component at
/// a time (`mkdirat` + `openat2` beneath the previous one, no symlinks), and returns
/// the last one opened `O_PATH`. A symlink anywhere on the way is refused.
pub fn create_dir_all(path: &Path) -> Result<OwnedFd> {
    let what = "create";
    let mut dir = rustix::fs::openat2(
        CWD,
        "/",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        no_symlinks(),
    )
    .map_err(|e| refused(path, what, e))?;
    for component in path.components() {
        let name = match component {
            Component::RootDir => continue,
            Component::Normal(name) => name,
            _ => return Err(refused(path, what, Errno::INVAL)),
        };
        match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(refused(path, what, e)),
        }
        dir = rustix::fs::openat2(
            &dir,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            no_symlinks() | ResolveFlags::BENEATH,
        )
        .map_err(|e| refused(path, what, e))?;
    }
    Ok(dir)
}

/// Bind-mounts `source` (a host path the guest cannot write) onto the directory
/// `target` holds, through `/proc/self/fd`, so the target is the one opened.
pub fn bind_onto(source: &Path, target: &OwnedFd, flags: nix::mount::MsFlags) -> nix::Result<()> {
    nix::mount::mount(
        Some(source),
        &proc_fd(target),
        None::<&str>,
        flags | nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
}

/// The path to mount onto the directory `target` holds (for mount calls that take a
/// path): `/proc/self/fd/<fd>`, valid while `target` is open.
pub fn mount_target(target: &OwnedFd) -> PathBuf {
    proc_fd(target)
}

/// Unmounts (lazily) everything stacked at `path`, resolving it without symlinks:
/// the parent is opened with `openat2`, the last component is unmounted through it
/// with `UMOUNT_NOFOLLOW`. Returns how many mounts were removed; an error when the
/// path holds a symlink (nothing is unmounted then). Not mounted is `Ok(0)`.
pub fn unmount(path: &Path) -> Result<usize> {
    let what = "unmount";
    let (parent, name) = match open_parent(path) {
        Ok(opened) => opened,
        Err(Errno::NOENT) => return Ok(0),
        Err(e) => return Err(refused(path, what, e)),
    };
    let target = proc_fd(&parent).join(name);
    let mut removed = 0;
    // Overlays may be stacked; unmount until nothing is left.
    for _ in 0..8 {
        match rustix::mount::unmount(&target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
            Ok(()) => removed += 1,
            // Not a mount point (any more), or gone.
            Err(Errno::INVAL | Errno::NOENT) => break,
            Err(e) => return Err(refused(path, what, e)),
        }
    }
    Ok(removed)
}

/// Removes the empty directory `path` with `unlinkat` in its parent, opened without
/// symlinks (a symlink there is not followed: `rmdir` of one fails). Missing is fine.
pub fn remove_dir(path: &Path) -> Result<()> {
    let what = "remove";
    let (parent, name) = match open_parent(path) {
        Ok(opened) => opened,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(refused(path, what, e)),
    };
    match rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(refused(path, what, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_refused_on_the_way_and_at_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let share = dir.path().join("shared");
        std::fs::create_dir(&share).expect("mkdir");
        std::os::unix::fs::symlink("/etc", share.join("to-etc")).expect("symlink");
        std::os::unix::fs::symlink("loop", share.join("loop")).expect("symlink");

        // Creating through a symlinked component: refused, nothing made under /etc.
        let err = create_dir_all(&share.join("to-etc/gpuvm-test-rootfs")).expect_err("refused");
        assert!(err.to_string().contains("is a symlink"), "{err}");
        assert!(!Path::new("/etc/gpuvm-test-rootfs").exists());
        // A symlink as the last component, and a loop.
        assert!(create_dir_all(&share.join("to-etc")).is_err());
        assert!(create_dir_all(&share.join("loop/x")).is_err());
        // Removing: the symlink is not followed.
        assert!(remove_dir(&share.join("to-etc")).is_err());
        assert!(remove_dir(&share.join("to-etc/ssl")).is_err());
        assert!(Path::new("/etc").is_dir());
        // Unmounting through a symlink: refused before any umount.
        let err = unmount(&share.join("to-etc/ssl")).expect_err("refused");
        assert!(err.to_string().contains("is a symlink"), "{err}");

        // Plain directories work.
        let made = create_dir_all(&share.join("c1/rootfs")).expect("plain");
        drop(made);
        assert!(share.join("c1/rootfs").is_dir());
        assert_eq!(unmount(&share.join("c1/rootfs")).expect("not mounted"), 0);
        remove_dir(&share.join("c1/rootfs")).expect("rmdir");
        remove_dir(&share.join("c1")).expect("rmdir");
        remove_dir(&share.join("c1")).expect("missing is fine");
        assert!(!share.join("c1").exists());
    }
}
