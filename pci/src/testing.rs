//! Fake sysfs trees for tests (cargo feature `testing`).
//!
//! [`SysfsBuilder`] lays out a temp directory the way the kernel lays out `/sys`:
//! `devices/pci0000:15/0000:15:01.0/…/<bdf>` holding `vendor`, `device`, `class`
//! (`0x…`), `numa_node`, `resource`, `reset_method`, `reset`, `driver_override`,
//! with relative symlinks for `bus/pci/devices/<bdf>`, `driver` →
//! `bus/pci/drivers/<name>` and `iommu_group` → `kernel/iommu_groups/<n>`, and
//! `kernel/iommu_groups/<n>/devices/<bdf>` back to the device. Beside `sys/` it
//! makes `dev/` (with `vfio/<group>` nodes) and `run/gpuvm/devices/` for locks.
//!
//! There is no kernel behind the files, so a write is only recorded: writable
//! attributes start empty (`driver_override` starts as the kernel's `(null)`)
//! and the crate appends each value and a newline, so [`FakeSysfs::writes`]
//! reads back every value written to a file, in order. [`FakeSysfs::settle`]
//! then plays the kernel's part: it applies the recorded `unbind` and
//! `drivers_probe` writes to the `driver` links.
//!
//! [`presets`] builds trees faithful to real machines.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tempfile::TempDir;

use crate::{PciAddress, Sysfs, VFIO_PCI_DRIVER};

/// Parses an address for a test.
///
/// # Panics
///
/// When `text` is not a PCI address: test fixtures are written by hand.
pub fn bdf(text: &str) -> PciAddress {
    match PciAddress::parse(text) {
        Ok(address) => address,
        Err(err) => panic!("bad address in a test fixture: {err}"),
    }
}

/// `resource` flags of a 32-bit, non-prefetchable memory BAR.
pub const BAR_MEM32: u64 = 0x0004_0200;
/// `resource` flags of a 64-bit, prefetchable memory BAR.
pub const BAR_MEM64_PREFETCH: u64 = 0x0014_220c;

/// One PCI function of a fake tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its address.
    pub address: PciAddress,
    /// The bridge it sits below; `None` for a function on a root bus.
    pub parent: Option<PciAddress>,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code.
    pub class: u32,
    /// Subsystem vendor and device ids.
    pub subsystem: Option<(u16, u16)>,
    /// `numa_node` contents; -1 for none.
    pub numa_node: i32,
    /// The bound driver.
    pub driver: Option<String>,
    /// The IOMMU group; ignored when the builder has the IOMMU off.
    pub iommu_group: Option<u32>,
    /// BARs as (index, start, size, flags).
    pub bars: Vec<(u8, u64, u64, u64)>,
    /// `reset_method` contents; `None` means neither `reset_method` nor `reset` exists.
    pub reset_method: Option<String>,
    /// (current speed, current width, max speed, max width).
    pub link: Option<(String, u8, String, u8)>,
}

impl DeviceSpec {
    /// A bare function: no driver, group, BARs, reset or link; NUMA node -1.
    ///
    /// # Panics
    ///
    /// When `address` is not a PCI address.
    pub fn new(address: &str, vendor: u16, device: u16, class: u32) -> Self {
        Self {
            address: bdf(address),
            parent: None,
            vendor,
            device,
            class,
            subsystem: None,
            numa_node: -1,
            driver: None,
            iommu_group: None,
            bars: Vec::new(),
            reset_method: None,
            link: None,
        }
    }

    /// An NVIDIA 3D controller (class 0x030200) with an H100-like BAR layout,
    /// FLR and bus reset, and a 32 GT/s x16 link. `start` places its BARs.
    pub fn nvidia_gpu(address: &str, device: u16, start: u64) -> Self {
        Self::new(address, 0x10de, device, 0x030200)
            .bar(0, start, 16 << 20, BAR_MEM32)
            .bar(
                1,
                0x2000_0000_0000 + start * 0x100,
                128 << 30,
                BAR_MEM64_PREFETCH,
            )
            .bar(
                3,
                0x2020_0000_0000 + start * 0x100,
                32 << 20,
                BAR_MEM64_PREFETCH,
            )
            .reset_method("flr bus")
            .link("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16)
    }

    /// A PCIe port or switch port (class 0x060400) bound to `pcieport`.
    pub fn bridge(address: &str, vendor: u16, device: u16) -> Self {
        Self::new(address, vendor, device, 0x060400).driver("pcieport")
    }

    /// Sets the parent bridge.
    ///
    /// # Panics
    ///
    /// When `parent` is not a PCI address.
    pub fn parent(mut self, parent: &str) -> Self {
        self.parent = Some(bdf(parent));
        self
    }

    /// Sets the NUMA node (-1 for none).
    pub fn numa(mut self, node: i32) -> Self {
        self.numa_node = node;
        self
    }

    /// Binds it to `driver`.
    pub fn driver(mut self, driver: &str) -> Self {
        self.driver = Some(driver.to_owned());
        self
    }

    /// Unbinds it.
    pub fn no_driver(mut self) -> Self {
        self.driver = None;
        self
    }

    /// Puts it in IOMMU group `group`.
    pub fn group(mut self, group: u32) -> Self {
        self.iommu_group = Some(group);
        self
    }

    /// Sets the subsystem ids.
    pub fn subsystem(mut self, vendor: u16, device: u16) -> Self {
        self.subsystem = Some((vendor, device));
        self
    }

    /// Adds a BAR.
    pub fn bar(mut self, index: u8, start: u64, size: u64, flags: u64) -> Self {
        self.bars.push((index, start, size, flags));
        self
    }

    /// Sets `reset_method` (and makes `reset` exist).
    pub fn reset_method(mut self, methods: &str) -> Self {
        self.reset_method = Some(methods.to_owned());
        self
    }

    /// Removes `reset_method` and `reset`: the function cannot be reset.
    pub fn no_reset(mut self) -> Self {
        self.reset_method = None;
        self
    }

    /// Sets the PCIe link state.
    pub fn link(mut self, speed: &str, width: u8, max_speed: &str, max_width: u8) -> Self {
        self.link = Some((speed.to_owned(), width, max_speed.to_owned(), max_width));
        self
    }
}

/// Builds a fake sysfs tree.
#[derive(Debug, Clone)]
pub struct SysfsBuilder {
    devices: Vec<DeviceSpec>,
    iommu: bool,
    vfio_pci_loaded: bool,
}

impl Default for SysfsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl SysfsBuilder {
    /// An empty host with the IOMMU on and `vfio-pci` loaded.
    pub fn new() -> Self {
        Self {
            devices: Vec::new(),
            iommu: true,
            vfio_pci_loaded: true,
        }
    }

    /// Adds a function. Parents must be added before their children.
    pub fn device(mut self, spec: DeviceSpec) -> Self {
        self.devices.push(spec);
        self
    }

    /// Changes the function at `address`.
    ///
    /// # Panics
    ///
    /// When there is no such function.
    pub fn modify(mut self, address: &str, change: impl FnOnce(DeviceSpec) -> DeviceSpec) -> Self {
        let address = bdf(address);
        let Some(index) = self.devices.iter().position(|d| d.address == address) else {
            panic!("no device {address} in this fake tree");
        };
        let spec = self.devices[index].clone();
        self.devices[index] = change(spec);
        self
    }

    /// Turns the IOMMU off: no groups, no `iommu_group` links.
    pub fn iommu_off(mut self) -> Self {
        self.iommu = false;
        self
    }

    /// Leaves `vfio-pci` unloaded: no `bus/pci/drivers/vfio-pci`.
    pub fn without_vfio_pci(mut self) -> Self {
        self.vfio_pci_loaded = false;
        self
    }

    /// The functions added so far.
    pub fn devices(&self) -> &[DeviceSpec] {
        &self.devices
    }

    /// Writes the tree into a new temp directory.
    pub fn build(&self) -> io::Result<FakeSysfs> {
        let dir = tempfile::Builder::new().prefix("gpuvm-sysfs-").tempdir()?;
        let fake = FakeSysfs {
            dir,
            settled: Mutex::new(HashMap::new()),
        };
        self.write_into(&fake)?;
        Ok(fake)
    }

    fn write_into(&self, fake: &FakeSysfs) -> io::Result<()> {
        let sys = fake.sys_root();
        for dir in ["bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups"] {
            fs::create_dir_all(sys.join(dir))?;
        }
        fs::write(sys.join("bus/pci/drivers_probe"), "")?;
        fs::create_dir_all(fake.dev_root().join("vfio"))?;
        fs::create_dir_all(fake.lock_dir())?;
        if self.vfio_pci_loaded {
            fs::write(fake.dev_root().join("vfio/vfio"), "")?;
            make_driver(&sys, VFIO_PCI_DRIVER)?;
        }

        // Where each function lives under devices/, relative to the sysfs root.
        let mut paths: HashMap<PciAddress, PathBuf> = HashMap::new();
        for spec in &self.devices {
            let path = match spec.parent {
                None => PathBuf::from(format!(
                    "devices/pci{:04x}:{:02x}",
                    spec.address.domain(),
                    spec.address.bus()
                )),
                Some(parent) => paths.get(&parent).cloned().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{}'s parent {parent} must be added first", spec.address),
                    )
                })?,
            }
            .join(spec.address.to_string());
            write_device(&sys, &path, spec, self.iommu)?;
            paths.insert(spec.address, path);
        }
        if self.iommu {
            for spec in &self.devices {
                let Some(group) = spec.iommu_group else {
                    continue;
                };
                if spec.driver.as_deref() == Some(VFIO_PCI_DRIVER) {
                    fs::write(fake.dev_root().join(format!("vfio/{group}")), "")?;
                }
            }
        }
        Ok(())
    }
}

fn make_driver(sys: &Path, name: &str) -> io::Result<()> {
    let dir = sys.join("bus/pci/drivers").join(name);
    fs::create_dir_all(&dir)?;
    for file in ["bind", "unbind", "new_id", "remove_id"] {
        let path = dir.join(file);
        if !path.exists() {
            fs::write(path, "")?;
        }
    }
    Ok(())
}

/// Makes `<sys>/<link>` a relative symlink to `<sys>/<target>`, as sysfs does.
fn relative_symlink(sys: &Path, link: &Path, target: &Path) -> io::Result<()> {
    let depth = link
        .parent()
        .map_or(0, |parent| parent.components().count());
    let mut relative = PathBuf::new();
    for _ in 0..depth {
        relative.push("..");
    }
    relative.push(target);
    symlink(relative, sys.join(link))
}

fn write_device(sys: &Path, path: &Path, spec: &DeviceSpec, iommu: bool) -> io::Result<()> {
    let dir = sys.join(path);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("vendor"), format!("0x{:04x}\n", spec.vendor))?;
    fs::write(dir.join("device"), format!("0x{:04x}\n", spec.device))?;
    fs::write(dir.join("class"), format!("0x{:06x}\n", spec.class))?;
    if let Some((vendor, device)) = spec.subsystem {
        fs::write(dir.join("subsystem_vendor"), format!("0x{vendor:04x}\n"))?;
        fs::write(dir.join("subsystem_device"), format!("0x{device:04x}\n"))?;
    }
    fs::write(dir.join("numa_node"), format!("{}\n", spec.numa_node))?;
    fs::write(dir.join("driver_override"), "(null)\n")?;
    fs::write(dir.join("resource"), resource_file(&spec.bars))?;
    if let Some(methods) = &spec.reset_method {
        fs::write(dir.join("reset_method"), format!("{methods}\n"))?;
        fs::write(dir.join("reset"), "")?;
    }
    if let Some((speed, width, max_speed, max_width)) = &spec.link {
        fs::write(dir.join("current_link_speed"), format!("{speed}\n"))?;
        fs::write(dir.join("current_link_width"), format!("{width}\n"))?;
        fs::write(dir.join("max_link_speed"), format!("{max_speed}\n"))?;
        fs::write(dir.join("max_link_width"), format!("{max_width}\n"))?;
    }
    let name = spec.address.to_string();
    relative_symlink(sys, &Path::new("bus/pci/devices").join(&name), path)?;
    if let Some(driver) = &spec.driver {
        make_driver(sys, driver)?;
        relative_symlink(
            sys,
            &path.join("driver"),
            &Path::new("bus/pci/drivers").join(driver),
        )?;
    }
    if let (true, Some(group)) = (iommu, spec.iommu_group) {
        let group_dir = Path::new("kernel/iommu_groups").join(group.to_string());
        fs::create_dir_all(sys.join(&group_dir).join("devices"))?;
        fs::write(sys.join(&group_dir).join("type"), "DMA\n")?;
        relative_symlink(sys, &path.join("iommu_group"), &group_dir)?;
        relative_symlink(sys, &group_dir.join("devices").join(&name), path)?;
    }
    Ok(())
}

/// `resource`: 13 lines (6 BARs, the ROM, 6 SR-IOV BARs) of `start end flags`.
fn resource_file(bars: &[(u8, u64, u64, u64)]) -> String {
    let mut lines: BTreeMap<u8, (u64, u64, u64)> = BTreeMap::new();
    for &(index, start, size, flags) in bars {
        lines.insert(index, (start, start + size - 1, flags));
    }
    let mut text = String::new();
    for index in 0..13u8 {
        let (start, end, flags) = lines.get(&index).copied().unwrap_or_default();
        text.push_str(&format!("0x{start:016x} 0x{end:016x} 0x{flags:016x}\n"));
    }
    text
}

/// A fake sysfs tree in a temp directory, removed on drop.
#[derive(Debug)]
pub struct FakeSysfs {
    dir: TempDir,
    /// How many lines of each write log `settle` has applied.
    settled: Mutex<HashMap<PathBuf, usize>>,
}

impl FakeSysfs {
    /// The temp directory holding `sys/`, `dev/` and `run/`.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The sysfs root, `<tmp>/sys`.
    pub fn sys_root(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// A [`Sysfs`] on this tree.
    pub fn sysfs(&self) -> Sysfs {
        Sysfs::new(self.sys_root())
    }

    /// The dev root, `<tmp>/dev` (holding `vfio/<group>`).
    pub fn dev_root(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// A lock directory, `<tmp>/run/gpuvm/devices`.
    pub fn lock_dir(&self) -> PathBuf {
        self.dir.path().join("run/gpuvm/devices")
    }

    /// The path of a function's attribute, `<sys>/bus/pci/devices/<bdf>/<name>`.
    pub fn device_file(&self, address: &PciAddress, name: &str) -> PathBuf {
        self.sysfs().device_dir(address).join(name)
    }

    /// Every value written to `path` (relative to the sysfs root, or absolute), in order.
    ///
    /// The initial `(null)` of `driver_override` is not a write and is left out.
    pub fn writes(&self, path: impl AsRef<Path>) -> io::Result<Vec<String>> {
        let text = fs::read_to_string(self.sys_root().join(path))?;
        Ok(text
            .lines()
            .filter(|line| *line != "(null)")
            .map(str::to_owned)
            .collect())
    }

    /// Every write made anywhere in the tree: (path relative to the sysfs root, value),
    /// sorted by path. Tests use it to assert that nothing else was written.
    pub fn all_writes(&self) -> io::Result<Vec<(String, String)>> {
        let mut writes = Vec::new();
        collect_writes(&self.sys_root(), &self.sys_root(), &mut writes)?;
        writes.sort();
        Ok(writes)
    }

    /// Plays the kernel's part after writes: each address written to a driver's
    /// `unbind` loses its `driver` link, then each address written to
    /// `drivers_probe` with no driver is bound to its `driver_override` (when
    /// that driver is loaded), and binding to `vfio-pci` makes `/dev/vfio/<group>`.
    /// Only writes made since the last call are applied.
    pub fn settle(&self) -> io::Result<()> {
        let sys = self.sys_root();
        let sysfs = self.sysfs();
        for entry in fs::read_dir(sys.join("bus/pci/drivers"))? {
            let unbind = entry?.path().join("unbind");
            for address in self.new_lines(&unbind)? {
                let link = sysfs.device_dir(&parse(&address)?).join("driver");
                if fs::read_link(&link).is_ok() {
                    fs::remove_file(link)?;
                }
            }
        }
        for address in self.new_lines(&sys.join("bus/pci/drivers_probe"))? {
            let address = parse(&address)?;
            let device = sysfs.device(&address).map_err(io::Error::other)?;
            let Some(driver) = device.driver_override.filter(|_| device.driver.is_none()) else {
                continue;
            };
            if !sysfs.driver_dir(&driver).is_dir() {
                continue;
            }
            let real = fs::canonicalize(sysfs.device_dir(&address))?;
            let real = real
                .strip_prefix(fs::canonicalize(&sys)?)
                .map_err(io::Error::other)?;
            relative_symlink(
                &sys,
                &real.join("driver"),
                &Path::new("bus/pci/drivers").join(&driver),
            )?;
            if let (VFIO_PCI_DRIVER, Some(group)) = (driver.as_str(), device.iommu_group) {
                fs::write(self.dev_root().join(format!("vfio/{group}")), "")?;
            }
        }
        Ok(())
    }

    fn new_lines(&self, log: &Path) -> io::Result<Vec<String>> {
        let text = match fs::read_to_string(log) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let mut settled = self
            .settled
            .lock()
            .map_err(|_| io::Error::other("a settle() call panicked"))?;
        let done = settled.entry(log.to_owned()).or_insert(0);
        let fresh = lines.get(*done..).unwrap_or_default().to_vec();
        *done = lines.len();
        Ok(fresh)
    }
}

fn parse(address: &str) -> io::Result<PciAddress> {
    PciAddress::parse(address.trim()).map_err(io::Error::other)
}

/// Files the crate writes to, whose contents are write logs.
const WRITABLE: &[&str] = &[
    "driver_override",
    "unbind",
    "bind",
    "drivers_probe",
    "reset",
];

fn collect_writes(root: &Path, dir: &Path, writes: &mut Vec<(String, String)>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            collect_writes(root, &path, writes)?;
        } else if kind.is_file() && WRITABLE.contains(&entry.file_name().to_string_lossy().as_ref())
        {
            let relative = path
                .strip_prefix(root)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            for line in fs::read_to_string(&path)?.lines() {
                if line != "(null)" {
                    writes.push((relative.clone(), line.to_owned()));
                }
            }
        }
    }
    Ok(())
}

/// Trees faithful to real machines.
pub mod presets {
    use super::{DeviceSpec, SysfsBuilder};

    const NVIDIA: u16 = 0x10de;
    const BROADCOM_PEX: (u16, u16) = (0x1000, 0xc030);
    const INTEL_ROOT_PORT: (u16, u16) = (0x8086, 0x352a);

    fn root_port(address: &str, numa: i32, group: u32) -> DeviceSpec {
        DeviceSpec::bridge(address, INTEL_ROOT_PORT.0, INTEL_ROOT_PORT.1)
            .numa(numa)
            .group(group)
    }

    fn switch_port(address: &str, parent: &str, numa: i32, group: u32) -> DeviceSpec {
        DeviceSpec::bridge(address, BROADCOM_PEX.0, BROADCOM_PEX.1)
            .parent(parent)
            .numa(numa)
            .group(group)
    }

    /// The GPUs of [`hgx_h100_8gpu`]: (address, NUMA node, switch upstream port).
    pub const HGX_H100_GPUS: [(&str, u32, &str); 8] = [
        ("0000:18:00.0", 0, "0000:16:00.0"),
        ("0000:19:00.0", 0, "0000:16:00.0"),
        ("0000:3d:00.0", 0, "0000:3b:00.0"),
        ("0000:3e:00.0", 0, "0000:3b:00.0"),
        ("0000:9d:00.0", 1, "0000:9b:00.0"),
        ("0000:9e:00.0", 1, "0000:9b:00.0"),
        ("0000:c3:00.0", 1, "0000:c1:00.0"),
        ("0000:c4:00.0", 1, "0000:c1:00.0"),
    ];

    /// The NVSwitches of [`hgx_h100_8gpu`].
    pub const HGX_H100_NVSWITCHES: [&str; 4] = [
        "0000:06:00.0",
        "0000:07:00.0",
        "0000:08:00.0",
        "0000:09:00.0",
    ];

    /// An 8×H100 SXM5 HGX board: two NUMA nodes, each with two Broadcom PEX
    /// switches holding two GPUs each; four NVSwitches (class 0x068000) behind a
    /// fifth switch; every function in its own IOMMU group (the switches do ACS).
    /// GPUs are bound to `vfio-pci`, NVSwitches to `nvidia-nvswitch`. The host also
    /// has a ConnectX-7 NIC and an NVMe drive in their own groups.
    pub fn hgx_h100_8gpu() -> SysfsBuilder {
        let mut builder = SysfsBuilder::new()
            .device(
                DeviceSpec::new("0000:00:00.0", 0x8086, 0x09a2, 0x060000)
                    .numa(0)
                    .group(0),
            )
            .device(
                DeviceSpec::new("0000:29:00.0", 0x15b3, 0x1021, 0x020700)
                    .numa(0)
                    .group(1)
                    .driver("mlx5_core")
                    .reset_method("flr"),
            )
            .device(
                DeviceSpec::new("0000:2a:00.0", 0x144d, 0xa824, 0x010802)
                    .numa(0)
                    .group(2)
                    .driver("nvme")
                    .reset_method("flr"),
            );
        let mut group = 10;
        let mut next_group = || {
            group += 1;
            group
        };
        // (root port, upstream port, downstream bus, NUMA node, endpoints).
        let switches: [(&str, &str, u8, i32, &[&str]); 5] = [
            (
                "0000:15:01.0",
                "0000:16:00.0",
                0x17,
                0,
                &["0000:18:00.0", "0000:19:00.0"],
            ),
            (
                "0000:3a:01.0",
                "0000:3b:00.0",
                0x3c,
                0,
                &["0000:3d:00.0", "0000:3e:00.0"],
            ),
            (
                "0000:9a:01.0",
                "0000:9b:00.0",
                0x9c,
                1,
                &["0000:9d:00.0", "0000:9e:00.0"],
            ),
            (
                "0000:c0:01.0",
                "0000:c1:00.0",
                0xc2,
                1,
                &["0000:c3:00.0", "0000:c4:00.0"],
            ),
            (
                "0000:03:01.0",
                "0000:04:00.0",
                0x05,
                0,
                &HGX_H100_NVSWITCHES,
            ),
        ];
        for (rp, up, down_bus, numa, endpoints) in switches {
            builder = builder
                .device(root_port(rp, numa, next_group()))
                .device(switch_port(up, rp, numa, next_group()));
            for (slot, endpoint) in endpoints.iter().enumerate() {
                let down = format!("0000:{down_bus:02x}:{slot:02x}.0");
                builder = builder.device(switch_port(&down, up, numa, next_group()));
                let spec = if HGX_H100_NVSWITCHES.contains(endpoint) {
                    DeviceSpec::new(endpoint, NVIDIA, 0x22a3, 0x068000)
                        .subsystem(NVIDIA, 0x1796)
                        .driver("nvidia-nvswitch")
                        .bar(
                            0,
                            0xe000_0000 + (slot as u64) * 0x0200_0000,
                            32 << 20,
                            0x0014_0204,
                        )
                        .reset_method("flr")
                } else {
                    let start = 0x9000_0000
                        + u64::from(down_bus) * 0x0400_0000
                        + (slot as u64) * 0x0100_0000;
                    DeviceSpec::nvidia_gpu(endpoint, 0x2330, start)
                        .subsystem(NVIDIA, 0x16c1)
                        .driver("vfio-pci")
                };
                builder = builder.device(spec.parent(&down).numa(numa).group(next_group()));
            }
        }
        builder
    }

    /// A workstation with one L40S (VGA class 0x030000, display on) whose HDMI
    /// audio function `.1` shares its IOMMU group 12. The GPU is bound to
    /// `nvidia`, the audio to `snd_hda_intel`; no NUMA (`numa_node` is -1).
    /// An NVMe drive and an Intel NIC sit under other root ports in their own groups.
    pub fn workstation_l40s() -> SysfsBuilder {
        SysfsBuilder::new()
            .device(DeviceSpec::new("0000:00:00.0", 0x1022, 0x14d8, 0x060000).group(10))
            .device(DeviceSpec::bridge("0000:00:01.1", 0x1022, 0x14db).group(11))
            .device(
                DeviceSpec::nvidia_gpu("0000:01:00.0", 0x26b9, 0xf000_0000)
                    .parent("0000:00:01.1")
                    .subsystem(NVIDIA, 0x1851)
                    .link("16.0 GT/s PCIe", 16, "16.0 GT/s PCIe", 16)
                    .group(12)
                    .driver("nvidia"),
            )
            .modify("0000:01:00.0", |gpu| DeviceSpec {
                class: 0x030000,
                ..gpu
            })
            .device(
                DeviceSpec::new("0000:01:00.1", NVIDIA, 0x22ba, 0x040300)
                    .parent("0000:00:01.1")
                    .subsystem(NVIDIA, 0x1851)
                    .bar(0, 0xf108_0000, 16 << 10, super::BAR_MEM32)
                    .group(12)
                    .driver("snd_hda_intel")
                    .reset_method("flr"),
            )
            .device(DeviceSpec::bridge("0000:00:02.1", 0x1022, 0x14db).group(13))
            .device(
                DeviceSpec::new("0000:02:00.0", 0x144d, 0xa80a, 0x010802)
                    .parent("0000:00:02.1")
                    .group(14)
                    .driver("nvme")
                    .reset_method("flr"),
            )
            .device(DeviceSpec::bridge("0000:00:02.2", 0x1022, 0x14db).group(15))
            .device(
                DeviceSpec::new("0000:03:00.0", 0x8086, 0x15f3, 0x020000)
                    .parent("0000:00:02.2")
                    .group(16)
                    .driver("igc")
                    .reset_method("flr"),
            )
    }

    /// A board where an H100 PCIe (0000:43:00.0) and a Mellanox ConnectX-6 NIC
    /// (0000:44:00.0, 0x15b3:0x101b, class 0x020000) sit behind a PLX switch
    /// without ACS, so both and the switch's downstream ports share IOMMU group 31.
    /// A second H100 PCIe (0000:c1:00.0, NUMA 1) is alone in group 40. Both GPUs
    /// are bound to `nvidia`.
    pub fn gpu_shares_group_with_nic() -> SysfsBuilder {
        SysfsBuilder::new()
            .device(root_port("0000:40:01.1", 0, 30))
            .device(
                DeviceSpec::bridge("0000:41:00.0", 0x10b5, 0x8747)
                    .parent("0000:40:01.1")
                    .numa(0)
                    .group(30),
            )
            .device(
                DeviceSpec::bridge("0000:42:08.0", 0x10b5, 0x8747)
                    .parent("0000:41:00.0")
                    .numa(0)
                    .group(31),
            )
            .device(
                DeviceSpec::bridge("0000:42:10.0", 0x10b5, 0x8747)
                    .parent("0000:41:00.0")
                    .numa(0)
                    .group(31),
            )
            .device(
                DeviceSpec::nvidia_gpu("0000:43:00.0", 0x2331, 0xd000_0000)
                    .parent("0000:42:08.0")
                    .numa(0)
                    .group(31)
                    .driver("nvidia"),
            )
            .device(
                DeviceSpec::new("0000:44:00.0", 0x15b3, 0x101b, 0x020000)
                    .parent("0000:42:10.0")
                    .numa(0)
                    .group(31)
                    .driver("mlx5_core")
                    .reset_method("flr"),
            )
            .device(root_port("0000:c0:01.1", 1, 39))
            .device(
                DeviceSpec::nvidia_gpu("0000:c1:00.0", 0x2331, 0xe000_0000)
                    .parent("0000:c0:01.1")
                    .numa(1)
                    .group(40)
                    .driver("nvidia"),
            )
    }

    /// A host with the IOMMU off (no groups, no `iommu_group` links) and two L4s
    /// bound to `nvidia` under their own root ports on NUMA node 0.
    pub fn iommu_off() -> SysfsBuilder {
        SysfsBuilder::new()
            .iommu_off()
            .device(root_port("0000:00:01.0", 0, 0))
            .device(
                DeviceSpec::nvidia_gpu("0000:01:00.0", 0x27b8, 0xa000_0000)
                    .parent("0000:00:01.0")
                    .numa(0)
                    .driver("nvidia"),
            )
            .device(root_port("0000:00:02.0", 0, 0))
            .device(
                DeviceSpec::nvidia_gpu("0000:02:00.0", 0x27b8, 0xa800_0000)
                    .parent("0000:00:02.0")
                    .numa(0)
                    .driver("nvidia"),
            )
    }

    /// Two A100 80GB PCIe: 0000:31:00.0 bound to `nvidia` (group 20, NUMA 0, bus
    /// reset only, as A100s have no FLR) and 0000:b1:00.0 already bound to
    /// `vfio-pci` (group 60, NUMA 1).
    pub fn a100_bound_to_nvidia() -> SysfsBuilder {
        SysfsBuilder::new()
            .device(root_port("0000:30:01.0", 0, 19))
            .device(
                DeviceSpec::nvidia_gpu("0000:31:00.0", 0x20b5, 0xc000_0000)
                    .parent("0000:30:01.0")
                    .subsystem(NVIDIA, 0x1533)
                    .reset_method("bus")
                    .link("16.0 GT/s PCIe", 16, "16.0 GT/s PCIe", 16)
                    .numa(0)
                    .group(20)
                    .driver("nvidia"),
            )
            .device(root_port("0000:b0:01.0", 1, 59))
            .device(
                DeviceSpec::nvidia_gpu("0000:b1:00.0", 0x20b5, 0xc800_0000)
                    .parent("0000:b0:01.0")
                    .subsystem(NVIDIA, 0x1533)
                    .reset_method("bus")
                    .link("8.0 GT/s PCIe", 8, "16.0 GT/s PCIe", 16)
                    .numa(1)
                    .group(60)
                    .driver("vfio-pci"),
            )
    }

    /// A synthetic host with `count` functions, for benchmarks: repeating blocks
    /// of ten (root port, switch upstream port, three downstream ports, an
    /// H100 with its audio function, a second H100, a two-function NIC), spread
    /// over PCI domains 40 blocks at a time, alternating NUMA nodes.
    pub fn large(count: usize) -> SysfsBuilder {
        let mut specs = Vec::with_capacity(count + 10);
        let mut group = 0u32;
        let mut next_group = || {
            group += 1;
            group
        };
        let mut block = 0usize;
        while specs.len() < count {
            let domain = block / 40;
            let slot = block % 40;
            let base = 1 + 6 * slot;
            let numa = (block % 2) as i32;
            let at = |bus: usize, dev: usize, func: usize| {
                format!("{domain:04x}:{bus:02x}:{dev:02x}.{func}")
            };
            let rp = at(0, slot / 8 + 1, slot % 8);
            let up = at(base, 0, 0);
            let downs = [at(base + 1, 0, 0), at(base + 1, 1, 0), at(base + 1, 2, 0)];
            let start = 0x8000_0000 + (block as u64) * 0x0400_0000;
            let gpu_group = next_group();
            specs.push(root_port(&rp, numa, next_group()));
            specs.push(switch_port(&up, &rp, numa, next_group()));
            for down in &downs {
                specs.push(switch_port(down, &up, numa, next_group()));
            }
            specs.push(
                DeviceSpec::nvidia_gpu(&at(base + 2, 0, 0), 0x2330, start)
                    .parent(&downs[0])
                    .numa(numa)
                    .group(gpu_group)
                    .driver("vfio-pci"),
            );
            specs.push(
                DeviceSpec::new(&at(base + 2, 0, 1), NVIDIA, 0x22a8, 0x040300)
                    .parent(&downs[0])
                    .numa(numa)
                    .group(gpu_group)
                    .driver("vfio-pci"),
            );
            specs.push(
                DeviceSpec::nvidia_gpu(&at(base + 3, 0, 0), 0x2330, start + 0x0200_0000)
                    .parent(&downs[1])
                    .numa(numa)
                    .group(next_group())
                    .driver("nvidia"),
            );
            let nic_group = next_group();
            for func in 0..2 {
                specs.push(
                    DeviceSpec::new(&at(base + 4, 0, func), 0x15b3, 0x1021, 0x020000)
                        .parent(&downs[2])
                        .numa(numa)
                        .group(nic_group)
                        .driver("mlx5_core")
                        .reset_method("flr"),
                );
            }
            block += 1;
        }
        specs.truncate(count);
        specs
            .into_iter()
            .fold(SysfsBuilder::new(), SysfsBuilder::device)
    }
}
