//! Both hypervisor backends against real binaries and a real Linux kernel. The guest
//! is a tiny initramfs made here (busybox as init, running `poweroff -f`), so a VM that
//! powers itself off must be noticed as the VM's exit.
//!
//! - Cloud Hypervisor with a real kernel: needs a KVM that boots real guests
//!   (requirement `kvm`; nested PVM does not), the binary (requirement
//!   `cloud-hypervisor`, found as `common::find_cloud_hypervisor` says) and a kernel;
//!   create → boot → info → shutdown → delete. Where KVM only boots tiny guests,
//!   `cloud_hypervisor.rs` runs the same lifecycle with the real binary.
//! - QEMU: needs a kernel (`GPUVM_TEST_KERNEL`, else `.work/guest/vmlinux` from
//!   `guest/build.sh`), `qemu-system-x86_64` and `vhost-device-vsock`
//!   (`scripts/vm-deps.sh`; requirement `qemu`); runs under TCG where KVM can't boot
//!   real guests.
//!
//! Each prints `SKIPPED: <reason>` through `gpuvm-testkit` when something is missing,
//! and fails instead when `GPUVM_REQUIRE` names what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::find_binary;
use gpuvm_shim::config::{Backend, GuestSize, ShimConfig};
use gpuvm_shim::hypervisor::{self, CloudHypervisor, Hypervisor, Qemu, VmSpec};
use gpuvm_testkit::{Requirement, skip};

const BUSYBOX: &str = "/bin/busybox";

/// Appends one newc cpio entry.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        1,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// An initramfs holding only a static busybox at `/busybox`.
fn poweroff_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read(BUSYBOX).expect("read busybox");
    let mut cpio = Vec::new();
    cpio_entry(&mut cpio, 1, "busybox", 0o100755, &busybox);
    cpio_entry(&mut cpio, 2, "TRAILER!!!", 0, &[]);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio).expect("write initramfs");
    path
}

/// A guest that powers itself off: busybox as init, running `poweroff -f`.
fn poweroff_spec(work: &Path, kernel: PathBuf) -> VmSpec {
    VmSpec {
        cmdline: hypervisor::kernel_cmdline("rdinit=/busybox -- poweroff -f"),
        size: GuestSize {
            cpus: 1,
            memory_mib: 256,
        },
        ..common::bare_vm_spec("vmtest", work.join("vm"), kernel, poweroff_initramfs(work))
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

fn short_tempdir() -> tempfile::TempDir {
    // Unix socket paths are limited to 108 bytes: keep the work dir short.
    tempfile::Builder::new()
        .prefix("gpuvm-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

#[tokio::test]
async fn cloud_hypervisor_lifecycle_and_guest_poweroff() {
    if !hypervisor::probe_kvm() {
        skip(
            Requirement::Kvm,
            "KVM here cannot boot real guests (no vmx/svm); cloud_hypervisor.rs runs the \
             Cloud Hypervisor lifecycle with tiny guests instead",
        );
        return;
    }
    let binary = match common::find_cloud_hypervisor() {
        Ok(b) => b,
        Err(reason) => {
            skip(Requirement::CloudHypervisor, &reason);
            return;
        }
    };
    let Some(kernel) = test_kernel() else {
        skip(
            Requirement::Qemu,
            "no guest kernel (set GPUVM_TEST_KERNEL or run guest/build.sh)",
        );
        return;
    };
    if !Path::new(BUSYBOX).exists() {
        skip(
            Requirement::Qemu,
            &format!("{BUSYBOX} (busybox-static) is missing"),
        );
        return;
    }
    let work = short_tempdir();
    let mut config = ShimConfig {
        backend: Backend::CloudHypervisor,
        ..ShimConfig::default()
    };
    config.binaries.cloud_hypervisor = binary;

    // 1. create → boot → info → shutdown → delete, on a guest that stays up: init
    //    sleeps instead of powering off.
    let mut spec = poweroff_spec(work.path(), kernel.clone());
    spec.cmdline = hypervisor::kernel_cmdline("rdinit=/busybox -- sleep 600");
    let ch = CloudHypervisor::new(&config, spec);
    ch.start(&|_| {}).await.expect("create and boot");
    assert!(ch.pid().is_some());
    assert_eq!(ch.vm_state().await.expect("vm.info"), "Running");
    tokio::time::timeout(Duration::from_secs(30), ch.shutdown())
        .await
        .expect("shutdown in time")
        .expect("shutdown");
    ch.cleanup().await;
    assert!(!work.path().join("vm").exists(), "work dir left behind");

    // 2. A guest that powers itself off is noticed as the VM's exit.
    let ch = CloudHypervisor::new(&config, poweroff_spec(work.path(), kernel));
    ch.start(&|_| {}).await.expect("create and boot");
    let exit = tokio::time::timeout(Duration::from_secs(60), ch.wait_exit()).await;
    ch.cleanup().await;
    exit.expect("guest power-off ends the VMM");
}

/// `GPUVM_TEST_KERNEL`, else the `vmlinux` that `guest/build.sh` leaves in
/// `.work/guest` (or `$GPUVM_GUEST_DIR`).
fn test_kernel() -> Option<PathBuf> {
    env_path("GPUVM_TEST_KERNEL").or_else(|| {
        let guest_dir = std::env::var_os("GPUVM_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.work/guest"));
        Some(guest_dir.join("vmlinux")).filter(|p| p.exists())
    })
}

#[tokio::test]
async fn qemu_guest_poweroff_is_noticed() {
    let Some(kernel) = test_kernel() else {
        skip(
            Requirement::Qemu,
            "no guest kernel (set GPUVM_TEST_KERNEL or run guest/build.sh)",
        );
        return;
    };
    let Some(qemu) = find_binary("QEMU_BIN", "qemu-system-x86_64") else {
        skip(
            Requirement::Qemu,
            "qemu-system-x86_64 not found (scripts/vm-deps.sh)",
        );
        return;
    };
    let Some(vsock) = find_binary("VHOST_DEVICE_VSOCK_BIN", "vhost-device-vsock") else {
        skip(
            Requirement::Qemu,
            "vhost-device-vsock not found (scripts/vm-deps.sh)",
        );
        return;
    };
    if !Path::new(BUSYBOX).exists() {
        skip(
            Requirement::Qemu,
            &format!("{BUSYBOX} (busybox-static) is missing"),
        );
        return;
    }
    let work = short_tempdir();
    let mut config = ShimConfig {
        backend: Backend::Qemu,
        ..ShimConfig::default()
    };
    config.binaries.qemu = qemu;
    config.binaries.vhost_device_vsock = vsock;
    let spec = poweroff_spec(work.path(), kernel);
    let vm = Qemu::new(&config, spec.clone(), hypervisor::probe_kvm());
    vm.start(&|_| {}).await.expect("start qemu");
    assert!(vm.pid().is_some());
    assert!(vm.vsock_socket().exists(), "hybrid-vsock socket missing");
    let exit = tokio::time::timeout(Duration::from_secs(120), vm.wait_exit()).await;
    let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
    vm.cleanup().await;
    let exit = exit.unwrap_or_else(|_| panic!("guest did not power off; console:\n{console}"));
    assert_eq!(exit.vmm_exit_code, 0, "console:\n{console}");
    assert!(!spec.work_dir.exists(), "work dir left behind");
}
