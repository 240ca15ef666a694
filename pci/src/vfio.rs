//! Binding GPUs to `vfio-pci`, checking that they are ready to pass, and resetting them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::class::{class_name, is_nvidia_gpu};
use crate::sysfs::write_attribute;
use crate::{Error, IommuGroup, PciAddress, Result, Sysfs, VFIO_PCI_DRIVER};

/// One write to a sysfs file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysfsWrite {
    /// The file written.
    pub path: PathBuf,
    /// The value, without the trailing newline.
    pub value: String,
}

/// What [`bind_group_to_vfio`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindReport {
    /// The IOMMU group.
    pub group: u32,
    /// The functions that go to the guest together (GPUs and companions), sorted.
    pub devices: Vec<PciAddress>,
    /// The sysfs writes made, in order; empty when everything was already bound.
    pub writes: Vec<SysfsWrite>,
}

/// Binds `gpu`'s whole IOMMU group to `vfio-pci`.
///
/// For each GPU and companion function of the group (bridges are left alone) that
/// is not already bound to `vfio-pci`: write `vfio-pci` to its `driver_override`
/// (unless already set), write its address to its current driver's `unbind` (when
/// bound to another driver), then write it to `bus/pci/drivers_probe`. A group
/// that is already bound is not written to at all.
///
/// Refused, before any write, when the IOMMU is off, when the device has no group,
/// when the group holds a host device (NIC, NVMe, …) or an NVSwitch, or when
/// `vfio-pci` is not loaded.
pub fn bind_group_to_vfio(sysfs: &Sysfs, gpu: &PciAddress) -> Result<BindReport> {
    let group = passable_group(sysfs, gpu)?;
    let devices: Vec<PciAddress> = group.passed_members().map(|m| m.address).collect();
    let pending: Vec<_> = group
        .passed_members()
        .filter(|member| member.driver.as_deref() != Some(VFIO_PCI_DRIVER))
        .collect();
    let mut writes = Vec::new();
    if !pending.is_empty() {
        let vfio_driver = sysfs.driver_dir(VFIO_PCI_DRIVER);
        if !vfio_driver.is_dir() {
            return Err(Error::VfioDriverMissing { path: vfio_driver });
        }
    }
    for member in pending {
        let address = member.address.to_string();
        let current = sysfs.device(&member.address)?;
        if current.driver_override.as_deref() != Some(VFIO_PCI_DRIVER) {
            let path = sysfs.device_dir(&member.address).join("driver_override");
            write(&mut writes, path, VFIO_PCI_DRIVER)?;
        }
        if let Some(driver) = &current.driver {
            write(
                &mut writes,
                sysfs.driver_dir(driver).join("unbind"),
                &address,
            )?;
        }
        write(&mut writes, sysfs.drivers_probe_path(), &address)?;
    }
    Ok(BindReport {
        group: group.number,
        devices,
        writes,
    })
}

fn write(writes: &mut Vec<SysfsWrite>, path: PathBuf, value: &str) -> Result<()> {
    write_attribute(&path, value)?;
    writes.push(SysfsWrite {
        path,
        value: value.to_owned(),
    });
    Ok(())
}

/// A GPU's IOMMU group, checked ready to hand to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioGroup {
    /// The group number.
    pub number: u32,
    /// The functions to pass to the VM (GPUs and companions), sorted.
    pub devices: Vec<PciAddress>,
    /// The VFIO group device, `/dev/vfio/<number>`.
    pub device_path: PathBuf,
}

/// Checks that `gpu` can be passed to a VM now: the IOMMU is on, its group holds no
/// host device, every function to pass is bound to `vfio-pci`, and `/dev/vfio/<group>`
/// exists under `dev_root` (`/dev` in production).
pub fn check_vfio_ready(sysfs: &Sysfs, dev_root: &Path, gpu: &PciAddress) -> Result<VfioGroup> {
    let group = passable_group(sysfs, gpu)?;
    if let Some(member) = group
        .passed_members()
        .find(|member| member.driver.as_deref() != Some(VFIO_PCI_DRIVER))
    {
        return Err(Error::NotBoundToVfio {
            address: member.address,
            driver: member.driver.clone(),
        });
    }
    let device_path = vfio_group_device(dev_root, gpu, group.number)?;
    Ok(VfioGroup {
        number: group.number,
        devices: group.passed_members().map(|m| m.address).collect(),
        device_path,
    })
}

/// `<dev_root>/vfio/<group>`, checked to exist.
pub fn vfio_group_device(dev_root: &Path, gpu: &PciAddress, group: u32) -> Result<PathBuf> {
    let path = dev_root.join("vfio").join(group.to_string());
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::VfioGroupDeviceMissing {
            address: *gpu,
            path,
        })
    }
}

/// Resets a function through its sysfs `reset` file (the kernel tries its
/// `reset_method`s in order: FLR, PM, bus reset, …).
///
/// Returns the methods the kernel will try. Fails with [`Error::NoResetMethod`]
/// when the function has none.
pub fn reset_device(sysfs: &Sysfs, address: &PciAddress) -> Result<Vec<String>> {
    let device = sysfs.device(address)?;
    let dir = sysfs.device_dir(address);
    let reset = dir.join("reset");
    if !device.has_reset {
        return Err(Error::NoResetMethod {
            address: *address,
            path: reset,
        });
    }
    let method_file = dir.join("reset_method");
    if device.reset_methods.is_empty() && method_file.exists() {
        return Err(Error::NoResetMethod {
            address: *address,
            path: method_file,
        });
    }
    write_attribute(&reset, "1")?;
    Ok(device.reset_methods)
}

/// The group of `gpu`, read fresh and checked safe to give away whole.
fn passable_group(sysfs: &Sysfs, gpu: &PciAddress) -> Result<IommuGroup> {
    // Fails with NoSuchDevice first, the clearest error for a wrong address.
    let ids = sysfs.ids(gpu)?;
    if !is_nvidia_gpu(ids.vendor, ids.class) {
        return Err(Error::NotAGpu {
            address: *gpu,
            vendor: ids.vendor,
            class: ids.class,
            class_name: class_name(ids.class),
        });
    }
    if !sysfs.iommu_enabled() {
        return Err(Error::IommuDisabled {
            address: *gpu,
            groups_dir: sysfs.iommu_groups_dir(),
        });
    }
    let number = sysfs.iommu_group(gpu)?.ok_or_else(|| Error::NoIommuGroup {
        address: *gpu,
        path: sysfs.device_dir(gpu).join("iommu_group"),
    })?;
    let group = IommuGroup::read(sysfs, number)?;
    group.check_passable(gpu)?;
    Ok(group)
}
