//! Boots the real guest image (guest/build.sh) under QEMU TCG with vhost-user vsock
//! (vhost-device-vsock) and a virtio-fs share (virtiofsd), and drives the agent over
//! the hybrid-vsock socket, exactly as the shim will.
//!
//! Prints `SKIPPED: <reason>` and passes when QEMU, vhost-device-vsock, virtiofsd or
//! the image is missing. `scripts/vm-deps.sh` installs the tools and `guest/build.sh`
//! builds the image; `GPUVM_GUEST_DIR` points elsewhere than `.work/guest`.

// Test helpers outside `#[test]` fns may panic on failure too.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use gpuvm_protocol::agent as pb;
use gpuvm_protocol::agent_ttrpc::AgentServiceClient;
use gpuvm_protocol::{AGENT_VSOCK_PORT, hybrid_vsock};

const SHARE_TAG: &str = "gpuvmshare";
const MEMORY: &str = "512M";

/// Children started by the test, killed by pid (and reaped) however the test ends.
struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn still_running(&mut self) -> Vec<&'static str> {
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

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/libexec"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn guest_dir() -> PathBuf {
    match std::env::var_os("GPUVM_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.work/guest"),
    }
}

fn wait_for_path(path: &Path, what: &str, children: &mut Children) {
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
fn copy_tree(from: &Path, to: &Path) {
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

fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn boots_the_guest_and_runs_a_container() {
    let test_start = Instant::now();
    let guest = guest_dir();
    let Some(qemu) = find_tool("qemu-system-x86_64") else {
        println!("SKIPPED: qemu-system-x86_64 is not installed (scripts/vm-deps.sh)");
        return;
    };
    let Some(vsock_backend) = find_tool("vhost-device-vsock") else {
        println!("SKIPPED: vhost-device-vsock is not installed (scripts/vm-deps.sh)");
        return;
    };
    let Some(virtiofsd) = find_tool("virtiofsd") else {
        println!("SKIPPED: virtiofsd is not installed (scripts/vm-deps.sh)");
        return;
    };
    let (vmlinux, initramfs, rootfs) = (
        guest.join("vmlinux"),
        guest.join("initramfs.cpio.gz"),
        guest.join("busybox-rootfs"),
    );
    if !vmlinux.is_file() || !initramfs.is_file() || !rootfs.is_dir() {
        println!(
            "SKIPPED: no guest image in {} (run guest/build.sh)",
            guest.display()
        );
        return;
    }
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
                MEMORY,
            ])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY},share=on"),
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
                &format!("console=ttyS0 panic=-1 quiet gpuvm.share={SHARE_TAG}"),
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
        Duration::from_secs(60),
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

    let info = client
        .guest_info(ctx(), &pb::GuestInfoRequest::new())
        .unwrap();
    assert!(
        manifest.contains(&format!("\"kernel_release\": \"{}\"", info.kernel_release)),
        "guest kernel {} is not the packed one: {manifest}",
        info.kernel_release
    );
    assert!(
        info.kernel_cmdline.contains("gpuvm.share="),
        "{}",
        info.kernel_cmdline
    );
    assert_eq!(info.shared_dir, "/run/gpuvm/shared");
    assert!(
        info.loaded_modules.iter().any(|m| m == "virtiofs"),
        "{:?}",
        info.loaded_modules
    );

    let (stdout, stderr, exit) = run(
        &client,
        "c1",
        "/run/gpuvm/shared/c1/rootfs",
        process(&["sh", "-c", "echo hello; exit 3"]),
    );
    assert_eq!(stdout, "hello\n", "stderr: {stderr}");
    assert_eq!(exit.exit_status, 3);

    // The container sees its own root, on the share, with /proc mounted.
    let (stdout, stderr, exit) = run(
        &client,
        "c2",
        "/run/gpuvm/shared/c1/rootfs",
        process(&[
            "sh",
            "-c",
            "cat /etc/passwd | grep -c nobody; ls /proc/self/ns/mnt",
        ]),
    );
    assert_eq!(
        (stdout.as_str(), exit.exit_status),
        ("1\n/proc/self/ns/mnt\n", 0),
        "{stderr}"
    );

    let err = create_and_start(
        &client,
        "c3",
        "/run/gpuvm/shared/c1/rootfs",
        process(&["no-such-cmd"]),
    )
    .unwrap_err();
    let (code, message) = status_of(err);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{message}");
    delete(&client, "c3", "");

    let (code, message) = status_of(
        client
            .gpu_info(ctx(), &pb::GpuInfoRequest::new())
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(message.contains("no NVIDIA driver"), "{message}");

    let stats = client.stats(ctx(), &pb::StatsRequest::new()).unwrap();
    println!(
        "guest kernel {} (host {}); boot to agent ready {:.2?}; agent RSS {} KiB; guest memory {} MiB total, {} MiB available",
        info.kernel_release,
        host_kernel_release(),
        ready,
        stats.agent_rss_bytes >> 10,
        stats.mem_total_bytes >> 20,
        stats.mem_available_bytes >> 20,
    );

    client.shutdown(ctx(), &pb::ShutdownRequest::new()).unwrap();
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    let qemu = children
        .0
        .iter_mut()
        .find(|(name, _)| *name == "qemu")
        .unwrap();
    let status = loop {
        if let Some(status) = qemu.1.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not exit after Shutdown\nconsole:\n{}",
            console_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "QEMU exited with {status}");
    // virtiofsd exits with its VM; vhost-device-vsock serves the next VM, so it is
    // stopped by pid here.
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.still_running().contains(&"virtiofsd") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(children);
    println!("vm test total {:.2?}", test_start.elapsed());
}
