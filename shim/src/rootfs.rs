//! Container root filesystems on the host side of the virtio-fs share.

use std::path::Path;

use containerd_shim::protos::types::mount::Mount as ContainerdMount;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// Makes the container's rootfs appear at `target` (inside the shared dir): mounts
/// containerd's rootfs mounts there, or bind-mounts the spec's `root.path` (`source`,
/// relative to the bundle or absolute) when containerd gave no mounts.
pub fn mount(
    mounts: &[ContainerdMount],
    bundle: &Path,
    source: &Path,
    target: &Path,
) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(Error::io(format!("cannot create {}", target.display())))?;
    if mounts.is_empty() {
        let source = bundle.join(source);
        nix::mount::mount(
            Some(&source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| Error::Io {
            context: format!("cannot bind {} to {}", source.display(), target.display()),
            source: e.into(),
        })?;
        return Ok(());
    }
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            target,
        )?;
    }
    Ok(())
}

/// Unmounts `target` (lazily, so a busy mount can't block teardown) and removes the
/// directory. Best effort.
pub fn unmount(target: &Path) {
    // Overlays may be stacked; unmount until nothing is left.
    for _ in 0..4 {
        if nix::mount::umount2(target, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_dir(target);
}

/// Bind-mounts `dir` onto itself with shared propagation, so that rootfs mounts made
/// under it later also appear in virtiofsd's (slave) mount namespace.
pub fn make_shared_mount(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let io = |what: &str, e: nix::Error| Error::Io {
        context: format!("cannot {what} {}", dir.display()),
        source: e.into(),
    };
    nix::mount::mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| io("bind-mount", e))?;
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| io("make shared", e))
}

/// Whether anything is mounted at or below `dir` (from `/proc/self/mountinfo`).
pub fn has_mounts_under(dir: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mount_points(&mountinfo).any(|point| Path::new(&point).starts_with(dir))
}

/// Mount points listed in a mountinfo text (field 5, with octal escapes decoded).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `dir` recursively unless something is still mounted under it (removing
/// through a mount would delete a container's image data).
pub fn remove_dir_if_unmounted(dir: &Path) {
    if has_mounts_under(dir) {
        tracing::warn!(dir = %dir.display(), "not removing: something is still mounted under it");
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_are_unescaped() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        let points: Vec<String> = mount_points(text).collect();
        assert_eq!(points, vec!["/mnt/with space", "/proc"]);
    }

    #[test]
    fn a_plain_directory_has_no_mounts_and_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = dir.path().join("vm");
        std::fs::create_dir_all(inner.join("shared")).expect("mkdir");
        assert!(!has_mounts_under(&inner));
        remove_dir_if_unmounted(&inner);
        assert!(!inner.exists());
        assert!(has_mounts_under(Path::new("/")));
    }
}
