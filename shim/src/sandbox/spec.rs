//! The VM a sandbox asks for, from the config, the pod's annotations and the devices
//! passed to it: a pure function, table-tested.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::config::{self, ShimConfig};
use crate::devices::Passthrough;
use crate::error::Result;
use crate::hypervisor::{self, MemoryOptions, VmSpec};

/// Where the VMs' private directories live on the host.
pub const RUN_DIR: &str = "/run/gpuvm";

/// The private directory of sandbox `id`'s VM (sockets, logs, the virtio-fs share).
pub fn work_dir(id: &str) -> PathBuf {
    PathBuf::from(RUN_DIR).join(id)
}

/// The kernel command line key that tells the agent whether to load the NVIDIA
/// modules (`load`, `off`; the agent's default is `auto`).
pub const NVIDIA_PARAM: &str = "gpuvm.nvidia";

/// The guest image a sandbox boots: the small one, or with devices passed the GPU
/// flavour (`guest.gpu_kernel` / `guest.gpu_initramfs`) and the NVIDIA modules asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// No devices: `guest.kernel` + `guest.initramfs`, `gpuvm.nvidia=off`.
    Small,
    /// VFIO devices: `guest.gpu_kernel` + `guest.gpu_initramfs`, `gpuvm.nvidia=load`.
    Gpu,
}

impl Flavour {
    /// The flavour for a sandbox passed `devices`.
    pub fn of(devices: Option<&Passthrough>) -> Flavour {
        match devices {
            Some(set) if !set.devices.is_empty() => Flavour::Gpu,
            _ => Flavour::Small,
        }
    }

    /// The kernel and initramfs of this flavour, each with the config key naming it.
    pub fn images(self, config: &ShimConfig) -> [(&'static str, PathBuf); 2] {
        let g = &config.guest;
        match self {
            Flavour::Small => [
                ("guest.kernel", g.kernel.clone()),
                ("guest.initramfs", g.initramfs.clone()),
            ],
            Flavour::Gpu => [
                {
                    let (key, kernel) = g.gpu_kernel();
                    (key, kernel.to_owned())
                },
                ("guest.gpu_initramfs", g.gpu_initramfs.clone()),
            ],
        }
    }

    /// `gpuvm.nvidia=load` or `gpuvm.nvidia=off`.
    pub fn kernel_param(self) -> String {
        let value = match self {
            Flavour::Small => "off",
            Flavour::Gpu => "load",
        };
        format!("{NVIDIA_PARAM}={value}")
    }
}

/// The VM of sandbox `id`: guest size from the annotations (within the config's
/// limits), the config's memory backing, the virtio-fs share under the work dir, and
/// `devices` with a 64-bit MMIO window that holds their BARs. The guest image is the
/// [`Flavour`] of `devices`; the config's `kernel_params` come last, so they can
/// override `gpuvm.nvidia`.
pub fn vm_spec(
    config: &ShimConfig,
    annotations: &HashMap<String, String>,
    devices: Option<&Passthrough>,
    id: &str,
) -> Result<VmSpec> {
    let size = config::guest_size(&config.guest, annotations)?;
    let hugepage_size = config.memory.hugepage_size_bytes()?;
    let work_dir = work_dir(id);
    let flavour = Flavour::of(devices);
    let [(_, kernel), (_, initramfs)] = flavour.images(config);
    Ok(VmSpec {
        id: id.to_owned(),
        kernel,
        initramfs,
        // The agent mounts the virtio-fs share with this tag.
        cmdline: hypervisor::kernel_cmdline(&format!(
            "gpuvm.share={} {} {}",
            hypervisor::SHARED_FS_TAG,
            flavour.kernel_param(),
            config.guest.kernel_params
        )),
        size,
        shared_dir: Some(crate::rootfs::ShareDirs::of(&work_dir).shared),
        work_dir,
        devices: devices.map(Passthrough::device_names).unwrap_or_default(),
        nics: Vec::new(),
        netns: None,
        mmio64_size: devices.and_then(|set| crate::devices::mmio64_window(&set.bar64_sizes)),
        memory: MemoryOptions {
            prefault: config.memory.prefault,
            hugepages: config.memory.hugepages,
            hugepage_size,
        },
        // The pod's cgroup, placed by the boot (it reads the host's mounts).
        cgroups: Vec::new(),
        numa: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuestSize;
    use crate::error::Error;
    use crate::service::tests::annotations;

    /// One table row: name, config, annotations, devices, the spec wanted.
    type Case<'a> = (
        &'a str,
        ShimConfig,
        HashMap<String, String>,
        Option<&'a Passthrough>,
        VmSpec,
    );

    /// Two H100s: a 128 GiB BAR1 and a 32 MiB BAR3 each.
    fn two_h100s() -> Passthrough {
        Passthrough {
            devices: vec![
                "0000:18:00.0".parse().expect("bdf"),
                "0000:19:00.0".parse().expect("bdf"),
            ],
            groups: Vec::new(),
            gpus: Vec::new(),
            bar64_sizes: vec![128 << 30, 32 << 20, 128 << 30, 32 << 20],
        }
    }

    /// The spec of sandbox `pod1` with the default config and no annotations.
    fn default_spec() -> VmSpec {
        VmSpec {
            id: "pod1".into(),
            work_dir: PathBuf::from("/run/gpuvm/pod1"),
            kernel: PathBuf::from("/usr/share/gpuvm/vmlinux"),
            initramfs: PathBuf::from("/usr/share/gpuvm/initramfs.img"),
            cmdline: "console=ttyS0 reboot=k panic=1 gpuvm.share=gpuvm gpuvm.nvidia=off".into(),
            size: GuestSize {
                cpus: 1,
                memory_mib: 1024,
            },
            shared_dir: Some(PathBuf::from("/run/gpuvm/pod1/share/shared")),
            devices: Vec::new(),
            nics: Vec::new(),
            netns: None,
            mmio64_size: None,
            memory: MemoryOptions::default(),
            cgroups: Vec::new(),
            numa: None,
        }
    }

    #[test]
    fn vm_spec_table() {
        let mut tuned = ShimConfig::default();
        tuned.guest.kernel_params = "quiet".into();
        tuned.memory.prefault = true;
        tuned.memory.hugepages = true;
        tuned.memory.hugepage_size = "2Mi".into();
        let gpus = two_h100s();
        let mut gpu_kernel = ShimConfig::default();
        gpu_kernel.guest.gpu_kernel = Some(PathBuf::from("/k/gpu-vmlinux"));
        gpu_kernel.guest.gpu_initramfs = PathBuf::from("/i/gpu.img");
        gpu_kernel.guest.kernel_params = "gpuvm.nvidia=auto".into();
        let cases: Vec<Case<'_>> = vec![
            (
                "defaults",
                ShimConfig::default(),
                annotations(&[]),
                None,
                default_spec(),
            ),
            (
                "size from the annotations",
                ShimConfig::default(),
                annotations(&[
                    (config::ANNOTATION_CPUS, "4"),
                    (config::ANNOTATION_MEMORY, "8Gi"),
                    (config::ANNOTATION_SANDBOX_CPU_PERIOD, "100000"),
                    (config::ANNOTATION_SANDBOX_CPU_QUOTA, "400000"),
                    (config::ANNOTATION_SANDBOX_CPU_SHARES, "4096"),
                    (config::ANNOTATION_SANDBOX_MEMORY, "8589934592"),
                ]),
                None,
                VmSpec {
                    size: GuestSize {
                        cpus: 4,
                        memory_mib: 8192,
                    },
                    ..default_spec()
                },
            ),
            (
                "size from the Pod's resources alone",
                ShimConfig::default(),
                annotations(&[
                    (config::ANNOTATION_SANDBOX_CPU_PERIOD, "100000"),
                    (config::ANNOTATION_SANDBOX_CPU_QUOTA, "200000"),
                    (config::ANNOTATION_SANDBOX_CPU_SHARES, "2048"),
                    (config::ANNOTATION_SANDBOX_MEMORY, "2147483648"),
                ]),
                None,
                VmSpec {
                    size: GuestSize {
                        cpus: 2,
                        memory_mib: 2048,
                    },
                    ..default_spec()
                },
            ),
            (
                "kernel params and memory backing from the config",
                tuned,
                annotations(&[]),
                None,
                VmSpec {
                    cmdline:
                        "console=ttyS0 reboot=k panic=1 gpuvm.share=gpuvm gpuvm.nvidia=off quiet"
                            .into(),
                    memory: MemoryOptions {
                        prefault: true,
                        hugepages: true,
                        hugepage_size: Some(2 << 20),
                    },
                    ..default_spec()
                },
            ),
            (
                "devices and a window for their BARs",
                ShimConfig::default(),
                annotations(&[]),
                Some(&gpus),
                VmSpec {
                    devices: vec!["0000:18:00.0".into(), "0000:19:00.0".into()],
                    mmio64_size: Some(1 << 40),
                    initramfs: PathBuf::from("/usr/share/gpuvm/initramfs-gpu.img"),
                    cmdline: "console=ttyS0 reboot=k panic=1 gpuvm.share=gpuvm gpuvm.nvidia=load"
                        .into(),
                    ..default_spec()
                },
            ),
            (
                "GPUs with their own kernel, gpuvm.nvidia overridden by the config",
                gpu_kernel,
                annotations(&[]),
                Some(&gpus),
                VmSpec {
                    devices: vec!["0000:18:00.0".into(), "0000:19:00.0".into()],
                    mmio64_size: Some(1 << 40),
                    kernel: PathBuf::from("/k/gpu-vmlinux"),
                    initramfs: PathBuf::from("/i/gpu.img"),
                    cmdline: "console=ttyS0 reboot=k panic=1 gpuvm.share=gpuvm gpuvm.nvidia=load \
                              gpuvm.nvidia=auto"
                        .into(),
                    ..default_spec()
                },
            ),
        ];
        for (name, config, annotations, devices, want) in cases {
            let got = vm_spec(&config, &annotations, devices, "pod1").expect(name);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_flavour_names_its_images_and_their_keys() {
        let mut config = ShimConfig::default();
        assert_eq!(Flavour::of(None), Flavour::Small);
        let none = Passthrough {
            devices: Vec::new(),
            ..two_h100s()
        };
        assert_eq!(Flavour::of(Some(&none)), Flavour::Small);
        assert_eq!(Flavour::of(Some(&two_h100s())), Flavour::Gpu);
        assert_eq!(
            Flavour::Gpu.images(&config),
            [
                ("guest.kernel", PathBuf::from("/usr/share/gpuvm/vmlinux")),
                (
                    "guest.gpu_initramfs",
                    PathBuf::from("/usr/share/gpuvm/initramfs-gpu.img")
                ),
            ]
        );
        config.guest.gpu_kernel = Some(PathBuf::from("/gk"));
        assert_eq!(
            Flavour::Gpu.images(&config)[0],
            ("guest.gpu_kernel", PathBuf::from("/gk"))
        );
        assert_eq!(
            Flavour::Small.images(&config)[1],
            (
                "guest.initramfs",
                PathBuf::from("/usr/share/gpuvm/initramfs.img")
            )
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut bad_hugepages = ShimConfig::default();
        bad_hugepages.memory.hugepages = true;
        bad_hugepages.memory.hugepage_size = "lots".into();
        let cases = [
            (
                ShimConfig::default(),
                annotations(&[(config::ANNOTATION_CPUS, "1000")]),
            ),
            (
                ShimConfig::default(),
                annotations(&[(config::ANNOTATION_MEMORY, "a lot")]),
            ),
            (bad_hugepages, annotations(&[])),
        ];
        for (config, annotations) in cases {
            let err = vm_spec(&config, &annotations, None, "pod1").expect_err("refused");
            assert!(
                matches!(err, Error::InvalidArgument(_) | Error::Config(_)),
                "{err:?}"
            );
        }
    }
}
