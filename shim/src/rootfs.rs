//! Container root filesystems on the host side of the virtio-fs share.

use std::path::Path;

use containerd_shim::protos::types::mount::Mount as ContainerdMount;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// Makes the container's rootfs appear at `target` (inside the shared dir): mounts
/// containerd's rootfs mounts there, or bind-mounts `<bundle>/rootfs` when containerd
/// prepared it already (no mounts given).
pub fn mount(mounts: &[ContainerdMount], bundle: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(Error::io(format!("cannot create {}", target.display())))?;
    if mounts.is_empty() {
        let source = bundle.join("rootfs");
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
