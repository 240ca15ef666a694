//! Container root filesystems on the host side of the virtio-fs share.
//!
//! The share is guest-writable: every path here is resolved without following
//! symlinks ([`crate::host_path`]).

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount as ContainerdMount;
use nix::mount::MsFlags;

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
    // The directory is opened as it is created, and the mounts go onto that open
    // directory: a symlink the guest plants on the way is refused, never followed.
    let dir = crate::host_path::create_dir_all(target)?;
    if mounts.is_empty() {
        let source = bundle.join(source);
        crate::host_path::bind_onto(&source, &dir, MsFlags::MS_REC).map_err(|e| Error::Io {
            context: format!("cannot bind {} to {}", source.display(), target.display()),
            source: e.into(),
        })?;
        return Ok(());
    }
    let onto = crate::host_path::mount_target(&dir);
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()),
            Some(m.source.as_str()),
            &m.options,
            &onto,
        )?;
    }
    Ok(())
}

/// Unmounts `target` (lazily, so a busy mount can't block teardown) and removes the
/// directory, both without following symlinks. Best effort: a path the guest turned
/// into a symlink is left alone (logged); [`remove_dir_if_unmounted`] finds the mount
/// where it really is.
pub fn unmount(target: &Path) {
    if let Err(e) = crate::host_path::unmount(target) {
        tracing::warn!(error = %e.full_message(), "not unmounted");
        return;
    }
    let _ = crate::host_path::remove_dir(target);
}

/// The VM's virtio-fs share on the host, Kata's layout: a tmpfs of its own (a size
/// limit of its own, not the host's `/run`), holding `mounts/` where the shim mounts
/// the containers' rootfs (`mounts/<id>/rootfs`, the shim's side, never the guest's)
/// and `shared/`, a read-only recursive bind of `mounts/` that virtiofsd serves. The
/// guest therefore sees a read-only tree (it cannot create, rename or plant a symlink
/// there) with each container's rootfs mount writable inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDirs {
    /// The tmpfs: `<work dir>/share`.
    pub root: PathBuf,
    /// The shim's writable side: `<root>/mounts`.
    pub mounts: PathBuf,
    /// The guest's read-only view, virtiofsd's `--shared-dir`: `<root>/shared`.
    pub shared: PathBuf,
}

impl ShareDirs {
    /// The share of the VM whose work dir is `work_dir`.
    pub fn of(work_dir: &Path) -> ShareDirs {
        let root = work_dir.join("share");
        ShareDirs {
            mounts: root.join("mounts"),
            shared: root.join("shared"),
            root,
        }
    }

    /// Its mounts, innermost first: the order to unmount them in.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        vec![self.shared.clone(), self.mounts.clone(), self.root.clone()]
    }
}

/// Mounts the share (see [`ShareDirs`]): the tmpfs (`size_bytes`, `nosuid,nodev,
/// noexec`, mode 0755), `mounts/` bound onto itself with shared propagation, so that
/// rootfs mounts made there later reach `shared/` and virtiofsd's (slave) mount
/// namespace, and `shared/` a recursive bind of it, remounted read-only. On failure
/// whatever was mounted is unmounted again.
pub fn mount_share(share: &ShareDirs, size_bytes: u64) -> Result<()> {
    let mounted = mount_share_steps(share, size_bytes);
    if mounted.is_err() {
        for point in share.mount_points() {
            unmount(&point);
        }
    }
    mounted
}

fn mount_share_steps(share: &ShareDirs, size_bytes: u64) -> Result<()> {
    let io = |what: &str, path: &Path, e: nix::Error| Error::Io {
        context: format!("cannot {what} {}", path.display()),
        source: e.into(),
    };
    let open = |path: &Path| {
        crate::host_path::open_no_symlinks(path).map_err(|e| Error::Io {
            context: format!("cannot open {}", path.display()),
            source: e.into(),
        })
    };
    let root = crate::host_path::create_dir_all(&share.root)?;
    nix::mount::mount(
        Some("tmpfs"),
        &crate::host_path::mount_target(&root),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={size_bytes},mode=0755").as_str()),
    )
    .map_err(|e| io("mount a tmpfs on", &share.root, e))?;
    let mounts = crate::host_path::create_dir_all(&share.mounts)?;
    let shared = crate::host_path::create_dir_all(&share.shared)?;
    crate::host_path::bind_onto(&share.mounts, &mounts, MsFlags::empty())
        .map_err(|e| io("bind-mount", &share.mounts, e))?;
    // The bind mount now covers `mounts`: open the mount itself to change it.
    let mounts = open(&share.mounts)?;
    nix::mount::mount(
        None::<&str>,
        &crate::host_path::mount_target(&mounts),
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| io("make shared", &share.mounts, e))?;
    // A bind of a shared mount joins its peer group: later rootfs mounts propagate.
    nix::mount::mount(
        Some(&crate::host_path::mount_target(&mounts)),
        &crate::host_path::mount_target(&shared),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| io("bind-mount", &share.shared, e))?;
    let shared = open(&share.shared)?;
    // Read-only for this mount only: the rootfs mounts below keep their own flags.
    nix::mount::mount(
        None::<&str>,
        &crate::host_path::mount_target(&shared),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| io("make read-only", &share.shared, e))
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = mount_points(&mountinfo)
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
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

/// Decodes mountinfo's octal escapes (`\040` for a space).
pub(crate) fn unescape_octal(s: &str) -> String {
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

/// Unmounts whatever is still mounted under `dir` (deepest first, where the kernel
/// says it is: the guest may have moved a rootfs's directory), then removes `dir`
/// recursively unless something is still mounted under it (removing through a mount
/// would delete a container's image data). Nothing is followed: the unmounts resolve
/// without symlinks, and `std::fs::remove_dir_all` unlinks a symlink instead of
/// descending into it.
pub fn remove_dir_if_unmounted(dir: &Path) {
    for point in mounts_under(dir) {
        if let Err(e) = crate::host_path::unmount(&point) {
            tracing::warn!(error = %e.full_message(), "not unmounted");
        }
    }
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
