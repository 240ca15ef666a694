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

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use gpuvm_shim::hypervisor::VmRecord;
use gpuvm_shim::persist::SandboxRecord;
use gpuvm_shim::rootfs::{ShareDirs, mount_share};
use gpuvm_testkit::Requirement;

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn is_mount_point(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

fn mount_tmpfs(path: &Path) {
    std::fs::create_dir_all(path).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
}

/// Detaches whatever a test left mounted under its temp dir, even when it failed
/// half-way, so a failure leaves no mount on the machine.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        for point in gpuvm_shim::rootfs::mounts_under(&self.0) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    gpuvm_testkit::skip(Requirement::Root, "mounting needs root");
    false
}

/// The teardown `shim delete` runs for a VM with these rootfs mounts.
fn clean_up(work: &Path, share: &ShareDirs, rootfs_mounts: &[PathBuf]) {
    let mut mounts = rootfs_mounts.to_vec();
    mounts.extend(share.mount_points());
    SandboxRecord {
        sandbox_id: "pod1".into(),
        vm: VmRecord {
            processes: Vec::new(),
            work_dir: work.to_owned(),
        },
        mounts,
        ..SandboxRecord::default()
    }
    .clean_up();
}

fn errno(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn the_guest_sees_a_read_only_share_on_its_own_tmpfs_with_writable_rootfs() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = UnmountOnDrop(dir.path().to_owned());
    let root_before = names(Path::new("/"));
    let etc_before = names(Path::new("/etc"));
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/bin")).expect("mkdir");
    std::fs::write(bundle.join("rootfs/bin/image-file"), "image data").expect("write");
    let work = dir.path().join("vm");
    let share = ShareDirs::of(&work);
    mount_share(&share, 16 << 20).expect("share");
    let rootfs = share.mounts.join("c1/rootfs");
    gpuvm_shim::rootfs::mount(&[], &bundle, Path::new("rootfs"), &rootfs).expect("rootfs");

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

    clean_up(&work, &share, std::slice::from_ref(&rootfs));
    assert!(!work.exists(), "work dir left behind");
    assert!(gpuvm_shim::rootfs::mounts_under(&work).is_empty());
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/bin/image-file")).expect("image data"),
        "image data"
    );
    assert_eq!(names(Path::new("/")), root_before);
    assert_eq!(names(Path::new("/etc")), etc_before);
}

#[test]
fn teardown_follows_no_symlink_the_guest_planted() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _unmount = UnmountOnDrop(dir.path().to_owned());
    let root_before = names(Path::new("/"));
    let etc_before = names(Path::new("/etc"));

    // The host side: a bundle with a rootfs (image data that must survive), a host
    // directory with a mount of its own, and the VM's work dir with its share.
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/bin")).expect("mkdir");
    std::fs::write(bundle.join("rootfs/bin/image-file"), "image data").expect("write");
    let host_dir = dir.path().join("host");
    mount_tmpfs(&host_dir.join("rootfs"));
    std::fs::write(host_dir.join("rootfs/host-file"), "host data").expect("write");
    let work = dir.path().join("vm");
    let share = ShareDirs::of(&work);
    mount_share(&share, 16 << 20).expect("share");
    // The shim's side of the share, as if the guest could write it.
    let shared = share.mounts.clone();
    let c1_rootfs = shared.join("c1/rootfs");
    gpuvm_shim::rootfs::mount(&[], &bundle, Path::new("rootfs"), &c1_rootfs).expect("c1 rootfs");
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
        gpuvm_shim::rootfs::mount(&[], &bundle, Path::new("rootfs"), &shared.join("c2/rootfs"))
            .expect_err("a symlinked rootfs directory is refused");
    assert!(
        err.full_message().contains("is a symlink"),
        "{}",
        err.full_message()
    );
    assert!(!Path::new("/etc/rootfs").exists());

    // `shim delete`'s teardown with the mounts recorded at create time.
    clean_up(&work, &share, std::slice::from_ref(&c1_rootfs));

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
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/bin/image-file")).expect("image data"),
        "image data"
    );
    assert_eq!(names(Path::new("/")), root_before);
    assert_eq!(names(Path::new("/etc")), etc_before);
    // And the VM's footprint is gone: the moved rootfs was found and unmounted.
    assert!(!work.exists(), "work dir left behind");
    let leftovers: Vec<PathBuf> = gpuvm_shim::rootfs::mounts_under(&work);
    assert!(leftovers.is_empty(), "{leftovers:?}");

    nix::mount::umount2(&host_dir.join("rootfs"), nix::mount::MntFlags::MNT_DETACH)
        .expect("unmount the host tmpfs");
}
