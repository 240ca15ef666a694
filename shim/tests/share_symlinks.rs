//! A guest that plants symlinks in the virtio-fs share cannot make the shim's teardown
//! (the same `SandboxRecord::clean_up` that `shim delete` runs, and the same rootfs
//! unmount and work-dir removal `Vm::stop` uses) follow them, nor make a container's
//! rootfs mount land outside the share.
//!
//! The "guest" here writes the share directly on the host, as virtiofsd would for it:
//! symlinks to `/`, to `/etc`, a loop, a container directory swapped for a symlink to a
//! host directory that has a mount of its own, and a symlinked directory where the
//! next container's rootfs goes.

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use gpuvm_shim::hypervisor::VmRecord;
use gpuvm_shim::persist::SandboxRecord;
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

#[test]
fn teardown_follows_no_symlink_the_guest_planted() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        gpuvm_testkit::skip(Requirement::Root, "mounting needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
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
    let shared = work.join("shared");
    gpuvm_shim::rootfs::make_shared_mount(&shared).expect("share mount");
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
    SandboxRecord {
        sandbox_id: "pod1".into(),
        vm: VmRecord {
            processes: Vec::new(),
            work_dir: work.clone(),
        },
        mounts: vec![c1_rootfs.clone(), shared.clone()],
        ..SandboxRecord::default()
    }
    .clean_up();

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
