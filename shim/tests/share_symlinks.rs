//! A guest that plants symlinks in the virtio-fs share cannot make the shim's teardown
//! (the same `SandboxRecord::clean_up` that `shim delete` runs, and the same rootfs
//! unmount and work-dir removal `Vm::stop` uses) follow them, nor make a container's
//! rootfs mount land outside the share.
//!
//! The share is Kata's layout (`rootfs::ShareDirs`): the guest's view is read-only
//! except for the rootfs mounts in it, on a tmpfs with its own size. The first test
//! checks that view; the second assumes the read-only view were bypassed and the
//! "guest" wrote the shim's side directly: symlinks to `/`, to `/etc`, a loop, a
//! container directory swapped for a symlink to a host directory that has a mount of
//! its own, and a symlinked directory where the next container's rootfs goes.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::share::{ShareFixture, errno, is_mount_point, mount_tmpfs};

#[test]
fn the_guest_sees_a_read_only_share_on_its_own_tmpfs_with_writable_rootfs() {
    let Some(f) = ShareFixture::new() else {
        return;
    };
    let share = &f.share;
    let rootfs = f.mount_rootfs("c1");

    // Its own filesystem, of the configured size, not the host's /run.
    let fs = nix::sys::statfs::statfs(&share.root).expect("statfs");
    assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC);
    assert_eq!(fs.blocks() * fs.block_size() as u64, 16 << 20);

    // What virtiofsd serves the guest: read-only everywhere but in the rootfs mount.
    let view = &share.shared;
    let erofs = Some(libc::EROFS);
    assert_eq!(errno(std::fs::write(view.join("planted"), "x")), erofs);
    assert_eq!(errno(symlink("/", view.join("to-root"))), erofs);
    assert_eq!(errno(symlink("/etc", view.join("c1/to-etc"))), erofs);
    assert_eq!(errno(std::fs::create_dir(view.join("c2"))), erofs);
    assert_eq!(
        errno(std::fs::rename(view.join("c1"), view.join("c1-moved"))),
        erofs
    );
    assert_eq!(errno(std::fs::remove_dir(view.join("c1/rootfs"))), erofs);
    assert_eq!(
        std::fs::read_to_string(view.join("c1/rootfs/bin/image-file")).expect("read"),
        "image data"
    );
    // The container writes its rootfs; its symlinks there are its own business and
    // the teardown follows none of them.
    std::fs::write(view.join("c1/rootfs/written"), "by the container").expect("rootfs is rw");
    symlink("/", view.join("c1/rootfs/to-root")).expect("symlink");
    symlink("/etc", view.join("c1/rootfs/to-etc")).expect("symlink");
    symlink("loop", view.join("c1/rootfs/loop")).expect("symlink");
    assert!(
        rootfs.join("written").exists(),
        "the shim's side sees the write"
    );

    f.clean_up(std::slice::from_ref(&rootfs));
    f.assert_host_untouched();
}

#[test]
fn teardown_follows_no_symlink_the_guest_planted() {
    // The host side: a bundle with a rootfs (image data that must survive), a host
    // directory with a mount of its own, and the VM's work dir with its share.
    let Some(f) = ShareFixture::new() else {
        return;
    };
    let bundle = &f.bundle;
    let host_dir = f.dir.path().join("host");
    mount_tmpfs(&host_dir.join("rootfs"));
    std::fs::write(host_dir.join("rootfs/host-file"), "host data").expect("write");
    // The shim's side of the share, as if the guest could write it.
    let shared = f.share.mounts.clone();
    let c1_rootfs = f.mount_rootfs("c1");
    assert!(c1_rootfs.join("bin/image-file").exists());

    // The guest plants its tree.
    symlink("/", shared.join("to-root")).expect("symlink");
    symlink("/etc", shared.join("to-etc")).expect("symlink");
    symlink("loop", shared.join("loop")).expect("symlink");
    symlink("/etc", c1_rootfs.join("etc-link")).expect("symlink in the rootfs");
    std::fs::rename(shared.join("c1"), shared.join("c1-moved")).expect("rename");
    symlink(&host_dir, shared.join("c1")).expect("symlink");
    symlink("/etc", shared.join("c2")).expect("symlink");

    // The next container's rootfs would land in /etc: refused, nothing made there.
    let err =
        gpuvm_shim::rootfs::mount(&[], bundle, Path::new("rootfs"), &shared.join("c2/rootfs"))
            .expect_err("a symlinked rootfs directory is refused");
    assert!(
        err.full_message().contains("is a symlink"),
        "{}",
        err.full_message()
    );
    assert!(!Path::new("/etc/rootfs").exists());

    // `shim delete`'s teardown with the mounts recorded at create time.
    f.clean_up(std::slice::from_ref(&c1_rootfs));

    // The host is untouched: the host mount the symlinked path named is still there
    // with its data, the image data survived, / and /etc hold what they held.
    assert!(
        is_mount_point(&host_dir.join("rootfs")),
        "a host mount was unmounted"
    );
    assert_eq!(
        std::fs::read_to_string(host_dir.join("rootfs/host-file")).expect("host data"),
        "host data"
    );
    // And the VM's footprint is gone: the moved rootfs was found and unmounted.
    f.assert_host_untouched();

    nix::mount::umount2(&host_dir.join("rootfs"), nix::mount::MntFlags::MNT_DETACH)
        .expect("unmount the host tmpfs");
}
