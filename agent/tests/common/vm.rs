//! Booting a guest image under QEMU TCG for the VM tests (`vm_boot.rs`,
//! `gpu_image.rs`): vhost-user vsock (vhost-device-vsock) and a virtio-fs share
//! (virtiofsd), the agent driven over the hybrid-vsock socket as the shim does.

// Test helpers may panic on failure.
#![allow(clippy::unwrap_used)]

use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuvm_protocol::agent as pb;
use gpuvm_protocol::agent_ttrpc::AgentServiceClient;
use gpuvm_protocol::{AGENT_VSOCK_PORT, hybrid_vsock};
use gpuvm_testkit::{Requirement, skip};

/// The virtio-fs tag of the share.
pub const SHARE_TAG: &str = "gpuvmshare";
/// Where the share's `c1/rootfs` is in the guest.
pub const ROOTFS: &str = "/run/gpuvm/shared/c1/rootfs";

/// An OCI mount.
pub fn oci_mount(destination: &str, type_: &str, source: &str, options: &[&str]) -> pb::Mount {
    pb::Mount {
        destination: destination.into(),
        type_: type_.into(),
        source: source.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The mounts of containerd's default OCI spec (what `ctr run` and CRI send), in order.
pub fn containerd_default_mounts() -> Vec<pb::Mount> {
    vec![
        oci_mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        oci_mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        oci_mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        oci_mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        oci_mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        oci_mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        oci_mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ]
}

/// A container at `rootfs` (a guest path) with containerd's default mounts.
pub fn default_spec_request(
    id: &str,
    rootfs: &str,
    process: pb::ProcessSpec,
) -> pb::CreateProcessRequest {
    pb::CreateProcessRequest {
        container_id: id.into(),
        rootfs: rootfs.into(),
        process: protobuf::MessageField::some(process),
        mounts: containerd_default_mounts(),
        ..Default::default()
    }
}

/// Children started by the test, killed by pid (and reaped) however the test ends.
pub struct Children(pub Vec<(&'static str, Child)>);

impl Children {
    pub fn still_running(&mut self) -> Vec<&'static str> {
        self.0
            .iter_mut()
            .filter_map(|(name, child)| matches!(child.try_wait(), Ok(None)).then_some(*name))
            .collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use gpuvm_testkit::find_tool;

pub fn wait_for_path(path: &Path, what: &str, children: &mut Children) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{what} did not create {} (still running: {:?})",
            path.display(),
            children.still_running()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies the busybox rootfs, symlinks as symlinks.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A booted guest: the agent's client, the host side of the share, the processes.
pub struct Guest {
    pub client: AgentServiceClient,
    /// Host directory shared as `/run/gpuvm/shared`; holds a busybox rootfs at `c1/rootfs`.
    pub share: PathBuf,
    pub console: PathBuf,
    pub manifest: String,
    /// QEMU start to the first Ping answered.
    pub ready: Duration,
    // Dropped after `client`, so the processes outlive the connection.
    pub children: Children,
    pub _tmp: tempfile::TempDir,
}

impl Guest {
    pub fn console_log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// Which image to boot and how.
#[derive(Debug, Clone)]
pub struct Image {
    /// The build's output directory (`vmlinux`, `initramfs.cpio.gz`, the rootfs).
    pub dir: PathBuf,
    /// The initramfs, when not `dir/initramfs.cpio.gz`.
    pub initramfs: Option<PathBuf>,
    /// The container rootfs in `dir` copied to `c1/rootfs` on the share.
    pub rootfs: &'static str,
    /// Guest memory (QEMU `-m`).
    pub memory: &'static str,
    /// Kernel command-line words after the usual ones.
    pub cmdline: String,
    /// What to skip on (or fail on, under `GPUVM_REQUIRE`) when the image is missing.
    pub requirement: Requirement,
    /// How to build it, for the skip message.
    pub build_hint: &'static str,
}

/// Boots the guest image, or prints SKIPPED and returns `None` when a tool or the
/// image is missing.
pub fn boot(image: &Image) -> Option<Guest> {
    let guest = &image.dir;
    let Some(qemu) = find_tool("qemu-system-x86_64") else {
        skip(
            Requirement::Qemu,
            "qemu-system-x86_64 is not installed (scripts/vm-deps.sh)",
        );
        return None;
    };
    let Some(vsock_backend) = find_tool("vhost-device-vsock") else {
        skip(
            Requirement::Qemu,
            "vhost-device-vsock is not installed (scripts/vm-deps.sh)",
        );
        return None;
    };
    let Some(virtiofsd) = find_tool("virtiofsd") else {
        skip(
            Requirement::Qemu,
            "virtiofsd is not installed (scripts/vm-deps.sh)",
        );
        return None;
    };
    let (vmlinux, initramfs, rootfs) = (
        guest.join("vmlinux"),
        image
            .initramfs
            .clone()
            .unwrap_or_else(|| guest.join("initramfs.cpio.gz")),
        guest.join(image.rootfs),
    );
    if !vmlinux.is_file() || !initramfs.is_file() || !rootfs.is_dir() {
        skip(
            image.requirement,
            &format!(
                "no guest image in {} (run {})",
                guest.display(),
                image.build_hint
            ),
        );
        return None;
    }
    let memory = image.memory;
    let manifest: String = std::fs::read_to_string(guest.join("manifest.json")).unwrap_or_default();

    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    copy_tree(&rootfs, &share.join("c1/rootfs"));
    let fs_socket = tmp.path().join("fs.sock");
    let vhost_socket = tmp.path().join("vhost-vsock.sock");
    let vsock_uds = tmp.path().join("vm.vsock");
    let console = tmp.path().join("console.log");
    let log = |name: &str| std::fs::File::create(tmp.path().join(name)).unwrap();

    let mut children = Children(Vec::new());
    children.0.push((
        "virtiofsd",
        Command::new(&virtiofsd)
            .arg(format!("--socket-path={}", fs_socket.display()))
            .arg(format!("--shared-dir={}", share.display()))
            .arg("--cache=never")
            .stdout(Stdio::null())
            .stderr(log("virtiofsd.log"))
            .spawn()
            .unwrap(),
    ));
    children.0.push((
        "vhost-device-vsock",
        Command::new(&vsock_backend)
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vhost_socket.display(),
                vsock_uds.display()
            ))
            .stdout(Stdio::null())
            .stderr(log("vhost-device-vsock.log"))
            .spawn()
            .unwrap(),
    ));
    wait_for_path(&fs_socket, "virtiofsd", &mut children);
    wait_for_path(&vhost_socket, "vhost-device-vsock", &mut children);

    let boot_start = Instant::now();
    children.0.push((
        "qemu",
        Command::new(&qemu)
            .args([
                "-machine",
                "q35,accel=tcg",
                "-cpu",
                "max",
                "-smp",
                "1",
                "-m",
                memory,
            ])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            ])
            .args(["-machine", "memory-backend=mem"])
            .args([
                "-chardev",
                &format!("socket,id=vs,path={}", vhost_socket.display()),
            ])
            .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
            .args([
                "-chardev",
                &format!("socket,id=fs,path={}", fs_socket.display()),
            ])
            .args([
                "-device",
                &format!("vhost-user-fs-pci,chardev=fs,tag={SHARE_TAG}"),
            ])
            .args(["-kernel"])
            .arg(&vmlinux)
            .args(["-initrd"])
            .arg(&initramfs)
            .args([
                "-append",
                &format!(
                    "console=ttyS0 panic=-1 quiet gpuvm.share={SHARE_TAG} {}",
                    image.cmdline
                ),
            ])
            .args([
                "-display",
                "none",
                "-nodefaults",
                "-no-reboot",
                "-no-user-config",
            ])
            .args(["-serial", &format!("file:{}", console.display())])
            .stdout(Stdio::null())
            .stderr(log("qemu.log"))
            .spawn()
            .unwrap(),
    ));
    let console_log = || std::fs::read_to_string(&console).unwrap_or_default();

    let stream = hybrid_vsock::connect_with_retry(
        &vsock_uds,
        AGENT_VSOCK_PORT,
        // Two guests boot at once when the tests run in parallel; TCG on a loaded
        // 2-core machine has needed 30 s for one.
        Duration::from_secs(180),
        Duration::from_millis(50),
    )
    .unwrap_or_else(|e| panic!("agent never answered: {e}\nconsole:\n{}", console_log()));
    let client = AgentServiceClient::new(ttrpc::Client::new(stream.into_raw_fd()).unwrap());
    client
        .ping(
            ttrpc::context::with_timeout(10_000_000_000),
            &pb::PingRequest::new(),
        )
        .unwrap();
    let ready = boot_start.elapsed();

    Some(Guest {
        client,
        share,
        console,
        manifest,
        ready,
        children,
        _tmp: tmp,
    })
}
