//! A VM's virtio-fs share on the host without a VM (`share_symlinks.rs`,
//! `volumes.rs`): a temp dir that is unmounted on drop, a bundle whose rootfs holds
//! image data, the share mounted as a sandbox mounts it, and the checks that the host
//! is as it was.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gpuvm_shim::hypervisor::VmRecord;
use gpuvm_shim::persist::SandboxRecord;
use gpuvm_shim::rootfs::{ShareDirs, mount_share};
use gpuvm_testkit::Requirement;

/// The names in `dir`.
pub fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether `path` is a mount point (`/proc/self/mountinfo`).
pub fn is_mount_point(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Mounts a 1 MiB tmpfs at `path` (created).
pub fn mount_tmpfs(path: &Path) {
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

/// The errno of a failed call, `None` when it succeeded.
pub fn errno(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
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

/// Image data every fixture's rootfs holds.
const IMAGE_DATA: &str = "image data";

/// A sandbox's share on the host, in a temp dir.
pub struct ShareFixture {
    // Dropped first: unmounts before the temp dir is removed.
    _unmount: UnmountOnDrop,
    /// The temp dir.
    pub dir: tempfile::TempDir,
    /// A bundle whose `rootfs/bin/image-file` holds image data.
    pub bundle: PathBuf,
    /// The VM's work dir (`<dir>/vm`).
    pub work: PathBuf,
    /// Its share, mounted (16 MiB).
    pub share: ShareDirs,
    root_before: BTreeSet<String>,
    etc_before: BTreeSet<String>,
}

impl ShareFixture {
    /// The fixture, or `None` after `SKIPPED` when not root (mounting needs it).
    pub fn new() -> Option<ShareFixture> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            gpuvm_testkit::skip(Requirement::Root, "mounting needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let unmount = UnmountOnDrop(dir.path().to_owned());
        let root_before = names(Path::new("/"));
        let etc_before = names(Path::new("/etc"));
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).expect("mkdir");
        std::fs::write(bundle.join("rootfs/bin/image-file"), IMAGE_DATA).expect("write");
        let work = dir.path().join("vm");
        let share = ShareDirs::of(&work);
        mount_share(&share, 16 << 20).expect("share");
        Some(ShareFixture {
            _unmount: unmount,
            dir,
            bundle,
            work,
            share,
            root_before,
            etc_before,
        })
    }

    /// Mounts the bundle's rootfs as container `id`'s, on the shim's side of the
    /// share; returns the mount.
    pub fn mount_rootfs(&self, id: &str) -> PathBuf {
        let rootfs = self.share.mounts.join(id).join("rootfs");
        gpuvm_shim::rootfs::mount(&[], &self.bundle, Path::new("rootfs"), &rootfs).expect("rootfs");
        rootfs
    }

    /// The teardown `shim delete` runs for a VM with these container `mounts`.
    pub fn clean_up(&self, mounts: &[PathBuf]) {
        let mut mounts = mounts.to_vec();
        mounts.extend(self.share.mount_points());
        SandboxRecord {
            sandbox_id: "pod1".into(),
            vm: VmRecord {
                processes: Vec::new(),
                work_dir: self.work.clone(),
            },
            mounts,
            ..SandboxRecord::default()
        }
        .clean_up();
    }

    /// The image data survived, `/` and `/etc` list what they listed before, and the
    /// VM's work dir is gone with nothing mounted under it.
    pub fn assert_host_untouched(&self) {
        assert_eq!(
            std::fs::read_to_string(self.bundle.join("rootfs/bin/image-file")).expect("image data"),
            IMAGE_DATA
        );
        assert_eq!(names(Path::new("/")), self.root_before);
        assert_eq!(names(Path::new("/etc")), self.etc_before);
        assert!(!self.work.exists(), "work dir left behind");
        let leftovers = gpuvm_shim::rootfs::mounts_under(&self.work);
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
