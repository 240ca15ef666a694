//! QEMU backend for machines whose KVM cannot boot real guests: TCG (or KVM where it
//! works), memfd shared memory, virtio-fs through `virtiofsd`, vsock through
//! `vhost-device-vsock` so the shim sees the same hybrid-vsock socket as with Cloud
//! Hypervisor.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::{GUEST_CID, SHARED_FS_TAG, SpawnHook, VmHost, VmSpec, Vmm};
use crate::config::ShimConfig;
use crate::error::{Error, Result};

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// vhost-user socket between QEMU and vhost-device-vsock.
fn vhost_vsock_socket(spec: &VmSpec) -> PathBuf {
    spec.work_dir.join("vhost-vsock.sock")
}

/// The QEMU command line for `spec` (pure; the test asserts it exactly).
pub fn qemu_args(spec: &VmSpec, accel: Accel) -> Result<Vec<String>> {
    if spec.size.cpus == 0 || spec.size.memory_mib == 0 {
        return Err(Error::VmConfig(
            "a VM needs at least one vCPU and some memory".into(),
        ));
    }
    for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
        if !path.is_absolute() {
            return Err(Error::VmConfig(format!(
                "{what} path {} must be absolute",
                path.display()
            )));
        }
    }
    if spec.cmdline.contains('\n') {
        return Err(Error::VmConfig("kernel command line has a newline".into()));
    }
    let mem = spec.size.memory_mib;
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("gpuvm-{}", spec.id),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        format!("q35,accel={accel_name},memory-backend=mem"),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.size.cpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // vhost-user needs guest memory the backends can map: shared memfd.
        "-object".into(),
        memory_backend(spec),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initramfs.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
        "-serial".into(),
        format!("file:{}", spec.console_log().display()),
        "-chardev".into(),
        format!(
            "socket,id=vsock,path={}",
            vhost_vsock_socket(spec).display()
        ),
        "-device".into(),
        "vhost-user-vsock-pci,chardev=vsock".into(),
    ];
    if spec.shared_dir.is_some() {
        args.push("-chardev".into());
        args.push(format!(
            "socket,id=fs,path={}",
            spec.virtiofs_socket().display()
        ));
        args.push("-device".into());
        args.push(format!("vhost-user-fs-pci,chardev=fs,tag={SHARED_FS_TAG}"));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        // QEMU runs in the pod's network namespace and opens the shim's tap by name.
        args.push("-netdev".into());
        args.push(format!(
            "tap,id=net{i},ifname={},script=no,downscript=no",
            nic.tap
        ));
        args.push("-device".into());
        args.push(format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac));
    }
    if let Some(window) = spec.mmio64_size.filter(|_| !spec.devices.is_empty()) {
        // Room for the GPUs' large 64-bit BARs (q35's default hole is 32 GiB).
        args.push("-global".into());
        args.push(format!("q35-pcihost.pci-hole64-size={}", qemu_size(window)));
    }
    for bdf in &spec.devices {
        args.push("-device".into());
        args.push(format!("vfio-pci,host={bdf}"));
    }
    Ok(args)
}

/// The guest RAM backend: shared memfd, on hugetlbfs pages and preallocated when the
/// config asks.
fn memory_backend(spec: &VmSpec) -> String {
    let mut backend = format!(
        "memory-backend-memfd,id=mem,size={}M,share=on",
        spec.size.memory_mib
    );
    if spec.memory.hugepages {
        backend.push_str(",hugetlb=on");
        if let Some(size) = spec.memory.hugepage_size {
            backend.push_str(&format!(",hugetlbsize={}", qemu_size(size)));
        }
    }
    if spec.memory.prefault {
        backend.push_str(",prealloc=on");
    }
    backend
}

/// A byte count in QEMU's size syntax, in the largest exact unit (`2M`, `1G`, `4T`).
pub fn qemu_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The arguments of `vhost-device-vsock` for `spec`.
pub fn vhost_device_vsock_args(spec: &VmSpec) -> Vec<String> {
    vec![
        "--vm".into(),
        format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            vhost_vsock_socket(spec).display(),
            spec.vsock_socket().display()
        ),
    ]
}

/// The QEMU backend.
#[derive(Debug)]
pub struct Qemu {
    host: VmHost,
    accel: Accel,
    qemu_binary: PathBuf,
    vsock_binary: PathBuf,
}

impl Qemu {
    /// A backend for `spec`, with KVM when `kvm_usable`.
    pub fn new(config: &ShimConfig, spec: VmSpec, kvm_usable: bool) -> Qemu {
        Qemu {
            host: VmHost::new(config, spec, "qemu"),
            accel: if kvm_usable { Accel::Kvm } else { Accel::Tcg },
            qemu_binary: config.binaries.qemu.clone(),
            vsock_binary: config.binaries.vhost_device_vsock.clone(),
        }
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn host(&self) -> &VmHost {
        &self.host
    }

    async fn start(&self, spawned: &SpawnHook<'_>) -> Result<()> {
        let spec = self.host.spec();
        let args = qemu_args(spec, self.accel)?;
        self.host.create_work_dir()?;

        let mut cmd = Command::new(&self.vsock_binary);
        cmd.args(vhost_device_vsock_args(spec))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(self.host.log_file("vhost-device-vsock.log")?);
        let vsock = self
            .host
            .spawn("vhost-device-vsock", &self.vsock_binary, cmd, spawned)?;
        self.host
            .wait_for_socket(&vhost_vsock_socket(spec), &vsock)
            .await?;

        self.host.start_virtiofsd(spawned).await?;

        let mut cmd = Command::new(&self.qemu_binary);
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(self.host.log_file("qemu.log")?)
            .stderr(self.host.log_file("qemu.log")?);
        let qemu = self.host.spawn_vmm(&self.qemu_binary, cmd, spawned)?;
        // QEMU fails fast on bad arguments or vhost-user errors: give it a moment so the
        // error names QEMU rather than a later agent timeout.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(exit) = qemu.exited() {
            let log = std::fs::read_to_string(spec.work_dir.join("qemu.log")).unwrap_or_default();
            return Err(Error::Hypervisor(format!(
                "qemu exited with code {} at start: {}",
                exit.code,
                log.trim()
            )));
        }
        tracing::info!(id = %spec.id, pid = qemu.pid(), accel = ?self.accel, "VM started (qemu)");
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        // QEMU exits cleanly on SIGTERM, like `vm.shutdown` + `vmm.shutdown`.
        if let Some(vmm) = self.host.vmm() {
            vmm.stop(self.host.shutdown_timeout()).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::tests::sample_spec;

    #[test]
    fn qemu_argv_for_tcg() {
        let args = qemu_args(&sample_spec(), Accel::Tcg).expect("valid");
        let want: Vec<&str> = vec![
            "-name",
            "gpuvm-sandbox1",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-machine",
            "q35,accel=tcg,memory-backend=mem",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024M",
            "-object",
            "memory-backend-memfd,id=mem,size=1024M,share=on",
            "-kernel",
            "/usr/share/gpuvm/vmlinux",
            "-initrd",
            "/usr/share/gpuvm/initramfs.img",
            "-append",
            "console=ttyS0 reboot=k panic=1",
            "-serial",
            "file:/run/gpuvm/sandbox1/console.log",
            "-chardev",
            "socket,id=vsock,path=/run/gpuvm/sandbox1/vhost-vsock.sock",
            "-device",
            "vhost-user-vsock-pci,chardev=vsock",
            "-chardev",
            "socket,id=fs,path=/run/gpuvm/sandbox1/virtiofs.sock",
            "-device",
            "vhost-user-fs-pci,chardev=fs,tag=gpuvm",
            "-netdev",
            "tap,id=net0,ifname=tap0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=net0,mac=02:42:0a:58:00:05",
            "-device",
            "vfio-pci,host=0000:3b:00.0",
        ];
        assert_eq!(args, want);
    }

    #[test]
    fn qemu_argv_with_gpus_large_bars_hugepages_and_prefault() {
        let mut spec = sample_spec();
        spec.nics.clear();
        spec.shared_dir = None;
        spec.devices = vec!["0000:18:00.0".into(), "0000:19:00.0".into()];
        spec.mmio64_size =
            crate::devices::mmio64_window(&[128 << 30, 32 << 20, 128 << 30, 32 << 20]);
        spec.memory = crate::hypervisor::MemoryOptions {
            prefault: true,
            hugepages: true,
            hugepage_size: Some(2 << 20),
        };
        let args = qemu_args(&spec, Accel::Kvm).expect("valid");
        let want: Vec<&str> = vec![
            "-name",
            "gpuvm-sandbox1",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-machine",
            "q35,accel=kvm,memory-backend=mem",
            "-cpu",
            "host",
            "-smp",
            "2",
            "-m",
            "1024M",
            "-object",
            "memory-backend-memfd,id=mem,size=1024M,share=on,hugetlb=on,hugetlbsize=2M,prealloc=on",
            "-kernel",
            "/usr/share/gpuvm/vmlinux",
            "-initrd",
            "/usr/share/gpuvm/initramfs.img",
            "-append",
            "console=ttyS0 reboot=k panic=1",
            "-serial",
            "file:/run/gpuvm/sandbox1/console.log",
            "-chardev",
            "socket,id=vsock,path=/run/gpuvm/sandbox1/vhost-vsock.sock",
            "-device",
            "vhost-user-vsock-pci,chardev=vsock",
            "-global",
            "q35-pcihost.pci-hole64-size=1T",
            "-device",
            "vfio-pci,host=0000:18:00.0",
            "-device",
            "vfio-pci,host=0000:19:00.0",
        ];
        assert_eq!(args, want);
    }

    #[test]
    fn qemu_sizes() {
        let cases = [
            (2 << 20, "2M"),
            (1 << 30, "1G"),
            (4 << 40, "4T"),
            (3 << 29, "1536M"),
            (1000, "1000"),
        ];
        for (bytes, want) in cases {
            assert_eq!(qemu_size(bytes), want);
        }
    }

    #[test]
    fn qemu_argv_for_kvm_uses_the_host_cpu() {
        let args = qemu_args(&sample_spec(), Accel::Kvm).expect("valid");
        assert!(args.contains(&"q35,accel=kvm,memory-backend=mem".to_string()));
        assert!(args.windows(2).any(|w| w == ["-cpu", "host"]));
    }

    #[test]
    fn bad_specs_are_rejected() {
        let mut spec = sample_spec();
        spec.size.cpus = 0;
        assert!(matches!(
            qemu_args(&spec, Accel::Tcg),
            Err(Error::VmConfig(_))
        ));
        let mut spec = sample_spec();
        spec.initramfs = PathBuf::from("initrd");
        assert!(matches!(
            qemu_args(&spec, Accel::Tcg),
            Err(Error::VmConfig(_))
        ));
    }

    #[test]
    fn vhost_device_vsock_argv() {
        assert_eq!(
            vhost_device_vsock_args(&sample_spec()),
            vec![
                "--vm",
                "guest-cid=3,socket=/run/gpuvm/sandbox1/vhost-vsock.sock,uds-path=/run/gpuvm/sandbox1/vsock.sock"
            ]
        );
    }
}
