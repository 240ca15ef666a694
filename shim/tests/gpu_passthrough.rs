//! End-to-end VFIO passthrough on a real host: runs when `GPUVM_TEST_GPU=<bdf>` names
//! a GPU whose IOMMU group is bound to `vfio-pci`, with KVM, `cloud-hypervisor`
//! (`CLOUD_HYPERVISOR_BIN`, default `/usr/bin/cloud-hypervisor`) and a guest kernel
//! (`GPUVM_TEST_KERNEL`). Otherwise it prints `SKIPPED: no GPU (set GPUVM_TEST_GPU=<bdf>)`
//! (a failure under `GPUVM_REQUIRE=gpu`).
//!
//! Checked: the device passes the shim's checks on the real `/sys` and `/dev`, is
//! locked, the 64-bit MMIO window covers its BARs, a Cloud Hypervisor VM boots with
//! it and is shut down, and the reset afterwards succeeds with no health record left.

use std::path::PathBuf;

use gpuvm_pci::Sysfs;
use gpuvm_shim::config::{GuestSize, ShimConfig};
use gpuvm_shim::devices;
use gpuvm_shim::hypervisor::{self, CloudHypervisor, Hypervisor, MemoryOptions, VmSpec};
use gpuvm_testkit::{Requirement, skip};

#[tokio::test]
async fn a_vfio_gpu_passes_into_a_cloud_hypervisor_vm_and_is_reset_after() {
    let Ok(gpu) = std::env::var("GPUVM_TEST_GPU") else {
        skip(Requirement::Gpu, "no GPU (set GPUVM_TEST_GPU=<bdf>)");
        return;
    };
    let Some(kernel) = std::env::var_os("GPUVM_TEST_KERNEL").map(PathBuf::from) else {
        skip(
            Requirement::Gpu,
            "no guest kernel for the GPU test (set GPUVM_TEST_KERNEL)",
        );
        return;
    };
    let gpu = gpuvm_pci::PciAddress::parse(&gpu)
        .unwrap_or_else(|e| panic!("GPUVM_TEST_GPU is not a PCI address: {e}"));
    let sysfs = Sysfs::new("/sys");
    let set = devices::check_devices(
        &sysfs,
        std::path::Path::new("/dev"),
        std::slice::from_ref(&gpu),
    )
    .unwrap_or_else(|e| panic!("{gpu} is not ready to pass: {}", e.full_message()));
    let dir = tempfile::tempdir().expect("tempdir");
    let lock =
        devices::lock_devices(&dir.path().join("locks"), &set.devices, "gpu-test").expect("lock");
    let window = devices::mmio64_window(&set.bar64_sizes);
    let bars: u64 = set.bar64_sizes.iter().sum();
    assert!(
        window.is_some_and(|w| w >= 2 * bars),
        "{window:?} for {bars}"
    );

    let mut config = ShimConfig::default();
    if let Some(ch) = std::env::var_os("CLOUD_HYPERVISOR_BIN") {
        config.binaries.cloud_hypervisor = PathBuf::from(ch);
    }
    let spec = VmSpec {
        id: "gputest".into(),
        work_dir: dir.path().join("vm"),
        kernel,
        initramfs: std::env::var_os("GPUVM_TEST_INITRAMFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/share/gpuvm/initramfs.img")),
        cmdline: hypervisor::kernel_cmdline(""),
        size: GuestSize {
            cpus: 2,
            memory_mib: 4096,
        },
        shared_dir: None,
        devices: set.device_names(),
        nics: vec![],
        netns: None,
        mmio64_size: window,
        memory: MemoryOptions {
            prefault: true,
            ..MemoryOptions::default()
        },
        cgroups: vec![],
        numa: None,
    };
    let vm = CloudHypervisor::new(&config, spec);
    vm.start(&|_| {}).await.expect("the VM boots with the GPU");
    assert_eq!(vm.vm_state().await.expect("vm.info"), "Running");
    vm.shutdown().await.expect("shutdown");
    vm.cleanup().await;

    let health = dir.path().join("health");
    let outcome = devices::reset_after_exit(&sysfs, &health, &set.devices);
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(outcome.reset, set.devices);
    drop(lock);
}
