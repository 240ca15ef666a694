//! Reading PCI devices from a sysfs root.
//!
//! The root is a parameter: `/sys` in production, a fake tree in tests (see the
//! `testing` feature). Every path this crate touches is built here.

use std::fs;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, PciAddress, Result};

/// A sysfs mount, `/sys` in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new(Self::PRODUCTION_ROOT)
    }
}

impl Sysfs {
    /// Where sysfs lives on a real host.
    pub const PRODUCTION_ROOT: &'static str = "/sys";

    /// A sysfs rooted at `root` (the directory holding `bus/`, `devices/`, `kernel/`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `bus/pci/devices`, one link per PCI function.
    pub fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// `bus/pci/devices/<address>`.
    pub fn device_dir(&self, address: &PciAddress) -> PathBuf {
        self.devices_dir().join(address.to_string())
    }

    /// `bus/pci/drivers/<name>`.
    pub fn driver_dir(&self, name: &str) -> PathBuf {
        self.root.join("bus/pci/drivers").join(name)
    }

    /// `bus/pci/drivers_probe`, where writing an address makes the kernel probe drivers for it.
    pub fn drivers_probe_path(&self) -> PathBuf {
        self.root.join("bus/pci/drivers_probe")
    }

    /// `kernel/iommu_groups`.
    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.root.join("kernel/iommu_groups")
    }

    /// Whether the IOMMU is on: `kernel/iommu_groups` exists and has at least one group.
    pub fn iommu_enabled(&self) -> bool {
        fs::read_dir(self.iommu_groups_dir())
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false)
    }

    /// Every PCI function on the host, sorted by address.
    ///
    /// Entries whose names are not PCI addresses are skipped.
    pub fn list_devices(&self) -> Result<Vec<PciAddress>> {
        let dir = self.devices_dir();
        let entries = fs::read_dir(&dir).map_err(|source| Error::Read {
            path: dir.clone(),
            source,
        })?;
        let mut addresses = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read {
                path: dir.clone(),
                source,
            })?;
            if let Some(address) = entry
                .file_name()
                .to_str()
                .and_then(|name| PciAddress::parse(name).ok())
            {
                addresses.push(address);
            }
        }
        addresses.sort();
        Ok(addresses)
    }

    /// The vendor id, device id and class of a function: the cheap first look a scan takes.
    pub fn ids(&self, address: &PciAddress) -> Result<DeviceIds> {
        read_ids(&self.existing_device_dir(address)?)
    }

    /// Everything this crate models about one function.
    pub fn device(&self, address: &PciAddress) -> Result<PciDevice> {
        let dir = self.existing_device_dir(address)?;
        let ids = read_ids(&dir)?;
        let (host_bridge, upstream) = self.topology(address)?;
        Ok(PciDevice {
            address: *address,
            vendor: ids.vendor,
            device: ids.device,
            class: ids.class,
            subsystem_vendor: read_optional(&dir.join("subsystem_vendor"))?
                .map(|text| parse_hex_u16(&dir.join("subsystem_vendor"), &text))
                .transpose()?,
            subsystem_device: read_optional(&dir.join("subsystem_device"))?
                .map(|text| parse_hex_u16(&dir.join("subsystem_device"), &text))
                .transpose()?,
            driver: link_name(&dir.join("driver"))?,
            driver_override: read_driver_override(&dir.join("driver_override"))?,
            iommu_group: self.iommu_group(address)?,
            numa_node: read_numa_node(&dir.join("numa_node"))?,
            host_bridge,
            upstream,
            bars: read_bars(&dir.join("resource"))?,
            reset_methods: read_optional(&dir.join("reset_method"))?
                .map(|text| text.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            has_reset: dir.join("reset").exists(),
            link: read_link_status(&dir)?,
        })
    }

    /// The driver the function is bound to, from its `driver` link.
    pub fn driver(&self, address: &PciAddress) -> Result<Option<String>> {
        link_name(&self.existing_device_dir(address)?.join("driver"))
    }

    /// The function's IOMMU group number, from its `iommu_group` link; `None` when it has none.
    pub fn iommu_group(&self, address: &PciAddress) -> Result<Option<u32>> {
        let link = self.device_dir(address).join("iommu_group");
        let Some(name) = link_name(&link)? else {
            return Ok(None);
        };
        name.parse().map(Some).map_err(|_| Error::Parse {
            path: link,
            content: name,
            expected: "a link to an IOMMU group number",
        })
    }

    /// The functions of IOMMU group `group`, sorted by address.
    pub fn iommu_group_members(&self, group: u32) -> Result<Vec<PciAddress>> {
        let dir = self
            .iommu_groups_dir()
            .join(group.to_string())
            .join("devices");
        let entries = fs::read_dir(&dir).map_err(|source| Error::Read {
            path: dir.clone(),
            source,
        })?;
        let mut members = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Read {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let address = PciAddress::parse(&name).map_err(|_| Error::Parse {
                path: entry.path(),
                content: name.clone().into_owned(),
                expected: "a PCI address",
            })?;
            members.push(address);
        }
        members.sort();
        Ok(members)
    }

    /// The host bridge (`pci0000:15`) and the bridges between it and the function,
    /// read from where the `bus/pci/devices` link points (`devices/pci0000:15/0000:15:01.0/…`).
    fn topology(&self, address: &PciAddress) -> Result<(Option<String>, Vec<PciAddress>)> {
        let link = self.device_dir(address);
        let target = match fs::read_link(&link) {
            Ok(target) => target,
            // Not a link (some container runtimes copy sysfs): no topology to read.
            Err(err) if err.kind() == io::ErrorKind::InvalidInput => return Ok((None, Vec::new())),
            Err(source) => return Err(Error::Read { path: link, source }),
        };
        let mut host_bridge = None;
        let mut chain = Vec::new();
        for component in target.components() {
            let Component::Normal(name) = component else {
                continue;
            };
            let Some(name) = name.to_str() else { continue };
            if let Ok(hop) = PciAddress::parse(name) {
                chain.push(hop);
            } else if name.starts_with("pci") && name.contains(':') {
                host_bridge = Some(name.to_owned());
                chain.clear();
            }
        }
        // The last hop is the function itself.
        if chain.last() == Some(address) {
            chain.pop();
        }
        Ok((host_bridge, chain))
    }

    fn existing_device_dir(&self, address: &PciAddress) -> Result<PathBuf> {
        let dir = self.device_dir(address);
        if dir.exists() {
            Ok(dir)
        } else {
            Err(Error::NoSuchDevice {
                address: *address,
                path: dir,
            })
        }
    }
}

/// The identity of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceIds {
    /// Vendor id (`vendor`).
    pub vendor: u16,
    /// Device id (`device`).
    pub device: u16,
    /// Class code, 24 bits: class, subclass, programming interface (`class`).
    pub class: u32,
}

/// One PCI function as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    /// Its address.
    pub address: PciAddress,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (24 bits).
    pub class: u32,
    /// Subsystem vendor id, when sysfs has one.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem device id, when sysfs has one.
    pub subsystem_device: Option<u16>,
    /// The bound driver (`nvidia`, `vfio-pci`, …), from the `driver` link.
    pub driver: Option<String>,
    /// The `driver_override`, when set.
    pub driver_override: Option<String>,
    /// The IOMMU group number; `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// The NUMA node; `None` when the kernel says -1 or has no NUMA.
    pub numa_node: Option<u32>,
    /// The host bridge the function hangs off, e.g. `pci0000:15`.
    pub host_bridge: Option<String>,
    /// The bridges between the host bridge and the function, root port first.
    pub upstream: Vec<PciAddress>,
    /// The BARs that are implemented (nonzero size), from `resource`.
    pub bars: Vec<Bar>,
    /// The reset methods the kernel offers (`flr`, `pm`, `bus`, …), from `reset_method`.
    pub reset_methods: Vec<String>,
    /// Whether the `reset` file exists (the kernel shows it only when some method works).
    pub has_reset: bool,
    /// PCIe link speed and width, when sysfs reports them.
    pub link: Option<PcieLink>,
}

impl PciDevice {
    /// The vendor, device and class together.
    pub fn ids(&self) -> DeviceIds {
        DeviceIds {
            vendor: self.vendor,
            device: self.device,
            class: self.class,
        }
    }

    /// The root port the function sits under, if any.
    pub fn root_port(&self) -> Option<PciAddress> {
        self.upstream.first().copied()
    }

    /// The upstream port of the nearest PCIe switch above the function.
    ///
    /// Below a switch the chain reads `…, upstream port, downstream port, function`;
    /// directly below a root port there is no switch. Two GPUs behind the same
    /// switch report the same upstream port.
    pub fn parent_switch(&self) -> Option<PciAddress> {
        match self.upstream.len() {
            0..=2 => None,
            len => Some(self.upstream[len - 2]),
        }
    }

    /// Whether the function can be reset through sysfs.
    pub fn can_reset(&self) -> bool {
        self.has_reset
    }

    /// The BAR with this index (0 to 5), when implemented.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|bar| bar.index == index)
    }
}

/// A base address register as `resource` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// BAR number, 0 to 5.
    pub index: u8,
    /// Start address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The kernel's `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Bar {
    const IORESOURCE_IO: u64 = 0x100;
    const IORESOURCE_PREFETCH: u64 = 0x2000;
    const IORESOURCE_MEM_64: u64 = 0x0010_0000;

    /// Whether this is an I/O port BAR rather than memory.
    pub fn is_io(&self) -> bool {
        self.flags & Self::IORESOURCE_IO != 0
    }

    /// Whether the memory is prefetchable.
    pub fn is_prefetchable(&self) -> bool {
        self.flags & Self::IORESOURCE_PREFETCH != 0
    }

    /// Whether this is a 64-bit memory BAR.
    pub fn is_64bit(&self) -> bool {
        self.flags & Self::IORESOURCE_MEM_64 != 0
    }
}

/// PCIe link state: a link trained below its maximum is a health signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcieLink {
    /// `current_link_speed`, e.g. `32.0 GT/s PCIe`.
    pub current_speed: String,
    /// `current_link_width`, lanes.
    pub current_width: u8,
    /// `max_link_speed`.
    pub max_speed: String,
    /// `max_link_width`, lanes.
    pub max_width: u8,
}

impl PcieLink {
    /// Whether the link runs slower or narrower than it can.
    pub fn is_degraded(&self) -> bool {
        self.current_width < self.max_width || self.current_speed != self.max_speed
    }
}

/// Writes `value` and a newline to a sysfs attribute, as `echo value > path` does.
///
/// The file is opened for appending and never created: on sysfs, appending is
/// the same as writing (attributes ignore the offset), and a missing attribute
/// must be an error, not a new file. On a fake tree the file keeps every value
/// written, in order, which is what tests read back.
pub(crate) fn write_attribute(path: &Path, value: &str) -> Result<()> {
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new().append(true).open(path)?;
        file.write_all(format!("{value}\n").as_bytes())
    };
    write().map_err(|source| Error::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

fn read_ids(dir: &Path) -> Result<DeviceIds> {
    Ok(DeviceIds {
        vendor: read_hex_u16(&dir.join("vendor"))?,
        device: read_hex_u16(&dir.join("device"))?,
        class: read_class(&dir.join("class"))?,
    })
}

fn read_trimmed(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|text| text.trim().to_owned())
        .map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn parse_hex(path: &Path, text: &str, expected: &'static str) -> Result<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Parse {
            path: path.to_owned(),
            content: text.to_owned(),
            expected,
        });
    }
    u64::from_str_radix(digits, 16).map_err(|_| Error::Parse {
        path: path.to_owned(),
        content: text.to_owned(),
        expected,
    })
}

fn parse_hex_u16(path: &Path, text: &str) -> Result<u16> {
    let value = parse_hex(path, text, "a 16-bit hex id")?;
    u16::try_from(value).map_err(|_| Error::Parse {
        path: path.to_owned(),
        content: text.to_owned(),
        expected: "a 16-bit hex id",
    })
}

fn read_hex_u16(path: &Path) -> Result<u16> {
    parse_hex_u16(path, &read_trimmed(path)?)
}

fn read_class(path: &Path) -> Result<u32> {
    let text = read_trimmed(path)?;
    let value = parse_hex(path, &text, "a 24-bit hex class code")?;
    match u32::try_from(value) {
        Ok(class) if class <= 0x00ff_ffff => Ok(class),
        _ => Err(Error::Parse {
            path: path.to_owned(),
            content: text,
            expected: "a 24-bit hex class code",
        }),
    }
}

fn read_numa_node(path: &Path) -> Result<Option<u32>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let node: i64 = text.parse().map_err(|_| Error::Parse {
        path: path.to_owned(),
        content: text.clone(),
        expected: "a NUMA node number or -1",
    })?;
    // The kernel writes -1 when firmware gave no affinity.
    Ok(u32::try_from(node).ok())
}

fn read_driver_override(path: &Path) -> Result<Option<String>> {
    // The kernel shows "(null)" when unset. A fake tree keeps every value written,
    // one per line, so the last line is the current one.
    Ok(read_optional(path)?.and_then(|text| {
        let current = text.lines().next_back().unwrap_or("").trim();
        (!current.is_empty() && current != "(null)").then(|| current.to_owned())
    }))
}

/// The last component of where a link points (`driver` → `…/drivers/nvidia` → `nvidia`).
fn link_name(link: &Path) -> Result<Option<String>> {
    match fs::read_link(link) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: link.to_owned(),
            source,
        }),
    }
}

/// `resource`: one line per region, `start end flags` in hex; lines 0-5 are the BARs
/// (then the expansion ROM and SR-IOV regions, which are not BARs of this function).
fn read_bars(path: &Path) -> Result<Vec<Bar>> {
    let Some(text) = read_optional(path)? else {
        return Ok(Vec::new());
    };
    let mut bars = Vec::new();
    for (index, line) in text.lines().take(6).enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(Error::Parse {
                path: path.to_owned(),
                content: line.to_owned(),
                expected: "a `start end flags` line",
            });
        };
        let expected = "a `start end flags` line of hex numbers";
        let start = parse_hex(path, start, expected)?;
        let end = parse_hex(path, end, expected)?;
        let flags = parse_hex(path, flags, expected)?;
        if end == 0 || end < start {
            continue;
        }
        bars.push(Bar {
            // At most six lines are read, so the index fits.
            index: index as u8,
            start,
            size: end - start + 1,
            flags,
        });
    }
    Ok(bars)
}

fn read_link_status(dir: &Path) -> Result<Option<PcieLink>> {
    let width = |name: &str| -> Result<Option<u8>> {
        let path = dir.join(name);
        read_optional(&path)?
            .map(|text| {
                text.parse().map_err(|_| Error::Parse {
                    path: path.clone(),
                    content: text.clone(),
                    expected: "a link width",
                })
            })
            .transpose()
    };
    let (Some(current_speed), Some(max_speed)) = (
        read_optional(&dir.join("current_link_speed"))?,
        read_optional(&dir.join("max_link_speed"))?,
    ) else {
        return Ok(None);
    };
    let (Some(current_width), Some(max_width)) =
        (width("current_link_width")?, width("max_link_width")?)
    else {
        return Ok(None);
    };
    Ok(Some(PcieLink {
        current_speed,
        current_width,
        max_speed,
        max_width,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_files_strictly() {
        let p = Path::new("/x/vendor");
        assert_eq!(parse_hex_u16(p, "0x10de").unwrap(), 0x10de);
        assert_eq!(parse_hex_u16(p, "10DE").unwrap(), 0x10de);
        let err = parse_hex_u16(p, "0x10de0").unwrap_err().to_string();
        assert_eq!(
            err,
            "/x/vendor holds `0x10de0`, which is not a 16-bit hex id"
        );
        assert!(parse_hex_u16(p, "0x").is_err());
        assert!(parse_hex_u16(p, "nvidia").is_err());
        assert!(parse_hex_u16(p, "-0x1").is_err());
    }

    #[test]
    fn reads_bars_numa_and_override_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let resource = dir.path().join("resource");
        fs::write(
            &resource,
            "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000200000000000 0x0000201fffffffff 0x000000000014220c\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x00000000fc000000 0x00000000fc07ffff 0x0000000000046200\n",
        )
        .unwrap();
        let bars = read_bars(&resource).unwrap();
        assert_eq!(bars.len(), 2, "the ROM line is not a BAR");
        assert_eq!((bars[0].index, bars[0].size), (0, 16 << 20));
        assert!(!bars[0].is_64bit() && !bars[0].is_prefetchable() && !bars[0].is_io());
        assert_eq!((bars[1].index, bars[1].size), (2, 128 << 30));
        assert!(bars[1].is_64bit() && bars[1].is_prefetchable());

        fs::write(&resource, "0x1000 0x1fff\n").unwrap();
        let err = read_bars(&resource).unwrap_err().to_string();
        assert!(err.contains("`0x1000 0x1fff`"), "{err}");

        let numa = dir.path().join("numa_node");
        fs::write(&numa, "-1\n").unwrap();
        assert_eq!(read_numa_node(&numa).unwrap(), None);
        fs::write(&numa, "1\n").unwrap();
        assert_eq!(read_numa_node(&numa).unwrap(), Some(1));
        fs::write(&numa, "one\n").unwrap();
        assert!(read_numa_node(&numa).is_err());
        assert_eq!(read_numa_node(&dir.path().join("absent")).unwrap(), None);

        let over = dir.path().join("driver_override");
        fs::write(&over, "(null)\n").unwrap();
        assert_eq!(read_driver_override(&over).unwrap(), None);
        write_attribute(&over, "vfio-pci").unwrap();
        assert_eq!(
            read_driver_override(&over).unwrap().as_deref(),
            Some("vfio-pci")
        );
    }

    #[test]
    fn write_attribute_never_creates_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("unbind");
        let err = write_attribute(&missing, "0000:01:00.0").unwrap_err();
        assert!(matches!(err, Error::Write { .. }));
        assert!(err.to_string().contains("`0000:01:00.0`"));
        assert!(!missing.exists());
    }

    #[test]
    fn link_is_degraded_when_below_max() {
        let link = PcieLink {
            current_speed: "16.0 GT/s PCIe".into(),
            current_width: 16,
            max_speed: "32.0 GT/s PCIe".into(),
            max_width: 16,
        };
        assert!(link.is_degraded());
        let healthy = PcieLink {
            current_speed: link.max_speed.clone(),
            ..link
        };
        assert!(!healthy.is_degraded());
    }
}
