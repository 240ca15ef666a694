//! The guest's NVIDIA driver: loading its kernel modules at boot, the device nodes,
//! persistence, the Xids of the kernel log, and the `GpuInfo` answer.
//!
//! Loading runs on its own thread ([`Driver::start`]), so the agent serves while
//! `nvidia.ko` initialises; `GpuInfo` and container creation wait for it. Parsers
//! (`/proc/devices`, the driver's per-GPU `information` file, kernel log records,
//! the PCI class) are pure and unit-tested.
//!
//! Persistence: once the device nodes exist the agent opens `/dev/nvidiactl` and every
//! `/dev/nvidiaN` and holds them for its whole life, as `nvidia-persistenced` does, so
//! the driver keeps each GPU initialised between CUDA processes instead of tearing
//! it down when the last client closes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpuvm_protocol::agent as pb;

use crate::boot::{self, NvidiaMode};
use crate::cdi;
use crate::error::{Error, Result, chain};
use crate::gpu;
use crate::process::{Launch, Process};
use crate::spec::ProcessSpec;

/// The NVIDIA modules, in load order (`guest/build.sh --gpu`); not in the always
/// loaded `/etc/gpuvm/modules.list`.
pub const MODULE_LIST: &str = "/etc/gpuvm/nvidia-modules.list";
/// The NVML helper (dynamically linked).
pub const CHECK_HELPER: &str = "/usr/bin/gpuvm-gpu-check";
/// Where the driver's user-space files are.
pub const DRIVER_LIB_DIR: &str = "/usr/lib/gpuvm/nvidia";
/// The fixed major of `nvidia.ko`'s devices.
pub const NVIDIA_MAJOR: u32 = 195;
/// How long `GpuInfo` lets the helper run.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a call waits for the modules to finish loading (TCG is slow).
pub const LOAD_WAIT: Duration = Duration::from_secs(300);
/// `GpuInfo` reports at most this many Xids (the latest).
pub const MAX_XIDS: usize = 64;

/// One module of the list, and what loading it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleOutcome {
    /// The kernel's name for it (`nvidia_uvm`).
    pub name: String,
    /// Why it is not loaded (`No such device`), `None` when it is.
    pub error: Option<String>,
}

/// A character device node the agent made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// `/dev/nvidia0`, ...
    pub path: PathBuf,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

/// A GPU as the loaded driver lists it in `/proc/driver/nvidia/gpus/<bus>/information`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverGpu {
    /// PCI address (`0000:01:00.0`), the directory's name.
    pub bus: String,
    /// "Device Minor": N of `/dev/nvidiaN`.
    pub minor: u32,
    /// "GPU UUID", when the driver printed one.
    pub uuid: Option<String>,
}

/// What happened at boot.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The modules were asked for (`gpuvm.nvidia=load`, or `auto` with a GPU).
    pub requested: bool,
    /// Why nothing was loaded although asked (no module list, ...).
    pub list_error: Option<String>,
    /// Each module of the list, in order.
    pub modules: Vec<ModuleOutcome>,
    /// GPUs the driver lists, by PCI address (= NVML's index order).
    pub gpus: Vec<DriverGpu>,
    /// The nodes made in `/dev`.
    pub device_nodes: Vec<DeviceNode>,
    /// The CDI spec written at boot, when the driver's files are in the image.
    pub cdi: Option<cdi::Spec>,
    /// Device files held open for persistence.
    held: Vec<File>,
}

impl Loaded {
    /// The first module error, as `nvidia: No such device`.
    pub fn module_error(&self) -> Option<String> {
        if let Some(error) = &self.list_error {
            return Some(error.clone());
        }
        self.modules
            .iter()
            .find_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.name)))
    }

    /// The names of the modules that loaded.
    pub fn loaded_modules(&self) -> Vec<String> {
        self.modules
            .iter()
            .filter(|m| m.error.is_none())
            .map(|m| m.name.clone())
            .collect()
    }
}

/// The driver's state, shared by the loading thread and the RPCs. The default is a
/// driver that was not asked for (process mode on a host).
#[derive(Debug)]
pub struct Driver {
    /// `None` while the modules are loading.
    loaded: Mutex<Option<Arc<Loaded>>>,
    done: Condvar,
}

impl Default for Driver {
    fn default() -> Self {
        Self {
            loaded: Mutex::new(Some(Arc::default())),
            done: Condvar::new(),
        }
    }
}

impl Driver {
    /// Decides from `mode` whether to load the modules, and does it on a thread.
    pub fn start(mode: NvidiaMode, release: String) -> Arc<Self> {
        let driver = Arc::new(Self {
            loaded: Mutex::new(None),
            done: Condvar::new(),
        });
        let worker = Arc::clone(&driver);
        let spawned = std::thread::Builder::new()
            .name("nvidia".into())
            .spawn(move || {
                let loaded = load(mode, &release);
                worker.finish(loaded);
            });
        if let Err(e) = spawned {
            tracing::error!("starting the NVIDIA loading thread failed: {e}");
            driver.finish(Loaded {
                list_error: Some(format!("the NVIDIA driver was not loaded: {e}")),
                ..Loaded::default()
            });
        }
        driver
    }

    fn finish(&self, loaded: Loaded) {
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(loaded));
        self.done.notify_all();
    }

    /// What boot did, waiting up to `timeout` for the loading to finish.
    pub fn wait(&self, timeout: Duration) -> Result<Arc<Loaded>> {
        let deadline = Instant::now() + timeout;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(loaded) = loaded.as_ref() {
                return Ok(Arc::clone(loaded));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::io(
                    "Waiting for the NVIDIA driver to load",
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            loaded = self
                .done
                .wait_timeout(loaded, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Whether a PCI function is an NVIDIA display or 3D controller (vendor `0x10de`,
/// class `0x03xxxx`), from its sysfs `vendor` and `class` files.
pub fn is_nvidia_gpu(vendor: &str, class: &str) -> bool {
    vendor.trim().eq_ignore_ascii_case("0x10de") && class.trim().starts_with("0x03")
}

/// Whether the guest's PCI bus (`/sys/bus/pci/devices`) has an NVIDIA GPU.
pub fn pci_has_nvidia_gpu(devices: &Path) -> bool {
    let Ok(entries) = fs::read_dir(devices) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let read = |name: &str| fs::read_to_string(entry.path().join(name)).unwrap_or_default();
        is_nvidia_gpu(&read("vendor"), &read("class"))
    })
}

/// The character-device majors of `/proc/devices`, by name.
pub fn char_majors(text: &str) -> BTreeMap<String, u32> {
    let mut majors = BTreeMap::new();
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        if !in_char {
            continue;
        }
        if let Some((major, name)) = line.split_once(char::is_whitespace)
            && let Ok(major) = major.parse()
        {
            majors.insert(name.trim().to_string(), major);
        }
    }
    majors
}

/// Parses the driver's `information` file of the GPU at `bus`.
pub fn parse_gpu_information(bus: &str, text: &str) -> Option<DriverGpu> {
    let field = |key: &str| {
        text.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    Some(DriverGpu {
        bus: bus.to_string(),
        minor: field("Device Minor")?.parse().ok()?,
        uuid: field("GPU UUID").filter(|u| u.starts_with("GPU-")),
    })
}

/// The GPUs under `/proc/driver/nvidia/gpus`, in PCI order.
pub fn driver_gpus(dir: &Path) -> Vec<DriverGpu> {
    let mut gpus: Vec<DriverGpu> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let bus = entry.file_name().to_string_lossy().into_owned();
            let text = fs::read_to_string(entry.path().join("information")).ok()?;
            parse_gpu_information(&bus, &text)
        })
        .collect();
    gpus.sort_by(|a, b| a.bus.cmp(&b.bus));
    gpus
}

/// The nodes the loaded modules need: `/dev/nvidiactl` (195:255), `/dev/nvidiaN`
/// (195:N) per GPU, `/dev/nvidia-modeset` (195:254) with `nvidia_modeset`, and
/// `/dev/nvidia-uvm` + `/dev/nvidia-uvm-tools` (the `nvidia-uvm` major, minors 0 and
/// 1) with `nvidia_uvm`.
pub fn device_nodes(
    loaded: &[String],
    gpus: &[DriverGpu],
    majors: &BTreeMap<String, u32>,
) -> Vec<DeviceNode> {
    let node = |path: String, major, minor| DeviceNode {
        path: PathBuf::from(path),
        major,
        minor,
    };
    let has = |name: &str| loaded.iter().any(|m| m == name);
    if !has("nvidia") {
        return Vec::new();
    }
    let mut nodes = vec![node("/dev/nvidiactl".into(), NVIDIA_MAJOR, 255)];
    for gpu in gpus {
        nodes.push(node(
            format!("/dev/nvidia{}", gpu.minor),
            NVIDIA_MAJOR,
            gpu.minor,
        ));
    }
    if has("nvidia_modeset") {
        nodes.push(node("/dev/nvidia-modeset".into(), NVIDIA_MAJOR, 254));
    }
    if has("nvidia_uvm")
        && let Some(major) = majors.get("nvidia-uvm")
    {
        nodes.push(node("/dev/nvidia-uvm".into(), *major, 0));
        nodes.push(node("/dev/nvidia-uvm-tools".into(), *major, 1));
    }
    nodes
}

/// An Xid the driver logged: `NVRM: Xid (PCI:0000:01:00): 79, pid=..., GPU has
/// fallen off the bus.`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xid {
    /// The PCI address as printed (`0000:01:00`).
    pub pci_bus_id: String,
    /// The Xid code.
    pub code: u32,
    /// The rest of the line.
    pub message: String,
    /// The record's timestamp (CLOCK_BOOTTIME, microseconds).
    pub uptime_us: u64,
}

/// Parses one `/dev/kmsg` record (`<prio>,<seq>,<usec>,<flags>[,...];<text>`), or
/// an Xid line without the record prefix (timestamp 0); `None` for anything else.
pub fn parse_xid(record: &str) -> Option<Xid> {
    let (uptime_us, text) = match record.split_once(';') {
        Some((prefix, text)) if prefix.split(',').count() >= 4 => {
            (prefix.split(',').nth(2)?.parse().ok()?, text)
        }
        _ => (0, record),
    };
    let text = text.lines().next()?.trim();
    let rest = &text[text.find("NVRM: Xid (")? + "NVRM: Xid (".len()..];
    let (address, rest) = rest.split_once("):")?;
    let pci_bus_id = address.strip_prefix("PCI:").unwrap_or(address).to_string();
    let rest = rest.trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let code = rest[..digits].parse().ok()?;
    let message = rest[digits..].trim_start_matches(',').trim().to_string();
    Some(Xid {
        pci_bus_id,
        code,
        message,
        uptime_us,
    })
}

/// The Xids still in the kernel's log buffer (`/dev/kmsg`), oldest first, at most
/// the last [`MAX_XIDS`]. Xids older than the buffer are lost.
pub fn read_xids(kmsg: &Path) -> Vec<Xid> {
    let Ok(mut file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(kmsg)
    else {
        return Vec::new();
    };
    let mut xids = Vec::new();
    // One read returns one record; EAGAIN at the end; EPIPE when records were
    // overwritten while reading (the next read goes on from the oldest one left).
    let mut record = vec![0u8; 8192];
    loop {
        match file.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(xid) = parse_xid(&String::from_utf8_lossy(&record[..n])) {
                    xids.push(xid);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let skip = xids.len().saturating_sub(MAX_XIDS);
    xids.split_off(skip)
}

/// The short text of a failed module load (`No such device`), else the chain.
fn short_error(error: &Error) -> String {
    match error {
        Error::Io { source, .. } if source.raw_os_error().is_some() => {
            let errno = nix::errno::Errno::from_raw(source.raw_os_error().unwrap_or(0));
            errno.desc().to_string()
        }
        other => chain(other),
    }
}

/// Boot: decides, loads the list, makes the nodes, holds them, writes the CDI spec.
fn load(mode: NvidiaMode, release: &str) -> Loaded {
    let requested = match mode {
        NvidiaMode::Off => false,
        NvidiaMode::Load => true,
        NvidiaMode::Auto => pci_has_nvidia_gpu(Path::new("/sys/bus/pci/devices")),
    };
    if !requested {
        tracing::info!(?mode, "NVIDIA modules not asked for");
        return Loaded::default();
    }
    let mut loaded = Loaded {
        requested,
        ..Loaded::default()
    };
    match boot::read_module_list(Path::new(MODULE_LIST)) {
        Ok(Some(list)) => loaded.modules = load_list(&list, release),
        Ok(None) => {
            loaded.list_error = Some(format!(
                "the NVIDIA driver was asked for, but the guest image has no {MODULE_LIST} \
                 (not the GPU image?)"
            ));
        }
        Err(error) => loaded.list_error = Some(chain(&error)),
    }
    let names = loaded.loaded_modules();
    if names.iter().any(|n| n == "nvidia") {
        loaded.gpus = driver_gpus(Path::new("/proc/driver/nvidia/gpus"));
        let majors = char_majors(&fs::read_to_string("/proc/devices").unwrap_or_default());
        let wanted = device_nodes(&names, &loaded.gpus, &majors);
        loaded.device_nodes = make_nodes(&wanted);
        loaded.held = hold_open(&loaded.device_nodes);
    }
    loaded.cdi = cdi::write_boot_spec(&loaded);
    tracing::info!(
        modules = ?names,
        error = loaded.module_error().unwrap_or_default(),
        nodes = loaded.device_nodes.len(),
        held = loaded.held.len(),
        "NVIDIA driver"
    );
    loaded
}

/// Loads the list in order; after a failure the rest (which need it) are not tried.
fn load_list(list: &[boot::ModuleEntry], release: &str) -> Vec<ModuleOutcome> {
    let mut outcomes = Vec::new();
    let mut failed: Option<String> = None;
    for entry in list {
        let name = boot::module_name(&entry.path);
        let error = match &failed {
            Some(first) => Some(format!("not tried: {first} failed to load")),
            None => match boot::load_module(entry, release) {
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!("{}", chain(&error));
                    failed = Some(name.clone());
                    Some(short_error(&error))
                }
            },
        };
        outcomes.push(ModuleOutcome { name, error });
    }
    outcomes
}

/// Makes each node (mode 0666, as nvidia-modprobe does); returns those that exist.
fn make_nodes(nodes: &[DeviceNode]) -> Vec<DeviceNode> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    nodes
        .iter()
        .filter(|node| {
            let mode = Mode::from_bits_truncate(0o666);
            let dev = makedev(u64::from(node.major), u64::from(node.minor));
            match mknod(&node.path, SFlag::S_IFCHR, mode, dev) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {
                    // mknod applies the umask.
                    let _ = nix::sys::stat::fchmodat(
                        nix::fcntl::AT_FDCWD,
                        &node.path,
                        mode,
                        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                    );
                    true
                }
                Err(e) => {
                    tracing::warn!("Creating {} failed: {e}", node.path.display());
                    false
                }
            }
        })
        .cloned()
        .collect()
}

/// Opens `/dev/nvidiactl` and the GPU nodes for persistence (see the module docs).
fn hold_open(nodes: &[DeviceNode]) -> Vec<File> {
    nodes
        .iter()
        .filter(|n| n.major == NVIDIA_MAJOR && n.minor != 254)
        .filter_map(|node| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&node.path)
                .map_err(|e| tracing::warn!("Opening {} failed: {e}", node.path.display()))
                .ok()
        })
        .collect()
}

/// Runs [`CHECK_HELPER`] in the guest's root and returns its stdout, or why not.
fn run_check_helper() -> std::result::Result<String, String> {
    let spec = ProcessSpec {
        args: vec![CHECK_HELPER.to_string()],
        env: vec![
            ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("LD_LIBRARY_PATH".into(), DRIVER_LIB_DIR.into()),
        ],
        ..ProcessSpec::default()
    };
    let process = Process::new("gpuvm-gpu-check", "", spec);
    let guest = crate::spec::ContainerSpec::default();
    let done = process
        .run_to_completion(Launch::Guest(&guest), CHECK_TIMEOUT)
        .map_err(|e| chain(&e))?;
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    if stdout.trim().is_empty() {
        return Err(format!(
            "{CHECK_HELPER} exited with status {} and printed nothing: {}",
            done.exit.exit_status,
            String::from_utf8_lossy(&done.stderr).trim()
        ));
    }
    Ok(stdout)
}

/// The `GpuInfo` answer. With neither the helper nor a module list in the image
/// (the small image), NVML is asked in-process, which fails with
/// [`Error::NoGpuDriver`] without a driver.
pub fn gpu_info(driver: &Driver) -> Result<pb::GpuInfoResponse> {
    let loaded = driver.wait(LOAD_WAIT)?;
    let has_helper = Path::new(CHECK_HELPER).is_file();
    if !has_helper && !Path::new(MODULE_LIST).is_file() {
        return Ok(response(Ok(gpu::gpu_report()?), &loaded));
    }
    let report = if let Some(error) = loaded.module_error() {
        Err(error)
    } else if !has_helper {
        Err(format!("the guest image has no {CHECK_HELPER}"))
    } else {
        run_check_helper().and_then(|out| gpu::parse_check_output(&out))
    };
    Ok(response(report, &loaded))
}

fn response(
    report: std::result::Result<gpu::GpuReport, String>,
    loaded: &Loaded,
) -> pb::GpuInfoResponse {
    let mut out = pb::GpuInfoResponse {
        modules: loaded.loaded_modules(),
        device_nodes: loaded
            .device_nodes
            .iter()
            .map(|n| n.path.display().to_string())
            .collect(),
        xid_events: read_xids(Path::new("/dev/kmsg"))
            .into_iter()
            .map(|x| pb::XidEvent {
                pci_bus_id: x.pci_bus_id,
                code: x.code,
                message: x.message,
                uptime_us: x.uptime_us,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    match report {
        Ok(report) => {
            out.driver_version = report.driver_version;
            out.cuda_driver_version = report.cuda_driver_version;
            out.gpus = report.gpus.into_iter().map(gpu_message).collect();
        }
        Err(error) => out.driver_error = error,
    }
    out
}

/// What a container gets of the driver: `None` when the modules were not asked for,
/// the image has no driver files, the container runs in the guest's root, or it
/// opted out (see [`cdi::select`]).
pub fn container_edits(
    driver: &Driver,
    container: &crate::spec::ContainerSpec,
    env: &[(String, String)],
    annotations: &std::collections::HashMap<String, String>,
) -> Result<Option<cdi::ContainerEdits>> {
    if container.rootfs.is_none() {
        return Ok(None);
    }
    match &driver.wait(LOAD_WAIT)?.cdi {
        Some(spec) => cdi::select(spec, env, annotations),
        None => Ok(None),
    }
}

fn gpu_message(g: gpu::Gpu) -> pb::Gpu {
    pb::Gpu {
        index: g.index,
        name: g.name,
        uuid: g.uuid,
        pci_bus_id: g.pci_bus_id,
        memory_total_bytes: g.memory_total_bytes,
        memory_used_bytes: g.memory_used_bytes,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/devices` of a guest with the driver loaded.
    const PROC_DEVICES: &str = "Character devices:
  1 mem
  4 /dev/vc/0
  4 tty
  5 /dev/tty
 10 misc
195 nvidia
195 nvidiactl
234 nvidia-uvm
235 nvidia-caps
254 gpiochip

Block devices:
  7 loop
234 nvidia-uvm-fake-block
259 blkext
";

    #[test]
    fn proc_devices_gives_character_majors_only() {
        let majors = char_majors(PROC_DEVICES);
        assert_eq!(majors.get("nvidia-uvm"), Some(&234));
        assert_eq!(majors.get("nvidia"), Some(&195));
        assert_eq!(majors.get("mem"), Some(&1));
        assert_eq!(majors.get("/dev/vc/0"), Some(&4));
        assert!(!majors.contains_key("loop"));
        assert!(!majors.contains_key("nvidia-uvm-fake-block"));
        assert!(char_majors("").is_empty());
        assert!(char_majors("Character devices:\nx y\n").is_empty());
    }

    const INFORMATION: &str = "Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 45
GPU UUID: \t GPU-4b8a1c9e-57f2-3d6a-9e0b-2f1c7d8e6a53
Video BIOS: \t 96.00.99.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:01:00.0
Device Minor: \t 3
GPU Excluded:\t No
";

    #[test]
    fn the_driver_information_file_gives_minor_and_uuid() {
        assert_eq!(
            parse_gpu_information("0000:01:00.0", INFORMATION),
            Some(DriverGpu {
                bus: "0000:01:00.0".into(),
                minor: 3,
                uuid: Some("GPU-4b8a1c9e-57f2-3d6a-9e0b-2f1c7d8e6a53".into()),
            })
        );
        assert_eq!(parse_gpu_information("x", "Model: x\n"), None);
        assert_eq!(
            parse_gpu_information("x", "Device Minor: 0\nGPU UUID: ???\n").and_then(|g| g.uuid),
            None
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn device_nodes_follow_the_loaded_modules() {
        let gpus = [0, 1].map(|minor| DriverGpu {
            bus: format!("0000:0{minor}:00.0"),
            minor,
            uuid: None,
        });
        let majors = char_majors(PROC_DEVICES);
        let all = device_nodes(
            &names(&["nvidia", "nvidia_uvm", "nvidia_modeset"]),
            &gpus,
            &majors,
        );
        let shown: Vec<(String, u32, u32)> = all
            .iter()
            .map(|n| (n.path.display().to_string(), n.major, n.minor))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("/dev/nvidiactl".into(), 195, 255),
                ("/dev/nvidia0".into(), 195, 0),
                ("/dev/nvidia1".into(), 195, 1),
                ("/dev/nvidia-modeset".into(), 195, 254),
                ("/dev/nvidia-uvm".into(), 234, 0),
                ("/dev/nvidia-uvm-tools".into(), 234, 1),
            ]
        );
        // nvidia alone, no GPU: the control node only; without nvidia: nothing.
        assert_eq!(device_nodes(&names(&["nvidia"]), &[], &majors).len(), 1);
        assert!(device_nodes(&names(&["nvidia_uvm"]), &gpus, &majors).is_empty());
        // uvm without its major in /proc/devices: no uvm nodes.
        assert_eq!(
            device_nodes(&names(&["nvidia", "nvidia_uvm"]), &[], &BTreeMap::new()).len(),
            1
        );
    }

    #[test]
    fn xid_records_parse() {
        let xid = parse_xid(
            "3,1187,8052161734,-;NVRM: Xid (PCI:0000:01:00): 79, pid=1234, name=python3, \
             GPU has fallen off the bus.\n",
        )
        .unwrap();
        assert_eq!(
            xid,
            Xid {
                pci_bus_id: "0000:01:00".into(),
                code: 79,
                message: "pid=1234, name=python3, GPU has fallen off the bus.".into(),
                uptime_us: 8_052_161_734,
            }
        );
        let gsp = parse_xid(
            "4,2001,912345,-,caller=T1;NVRM: Xid (PCI:0000:9a:00): 119, pid=812, name=nvidia-smi, \
             Timeout waiting for RPC from GSP! Expected function 76 (GSP_RM_CONTROL)",
        )
        .unwrap();
        assert_eq!((gsp.code, gsp.pci_bus_id.as_str()), (119, "0000:9a:00"));
        assert_eq!(gsp.uptime_us, 912_345);
        // A line from dmesg, without the record prefix.
        let plain =
            parse_xid("[  12.5] NVRM: Xid (PCI:0000:18:00): 48, pid='<unknown>', DBE").unwrap();
        assert_eq!((plain.code, plain.uptime_us), (48, 0));
        for other in [
            "6,1,2,-;NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  550.163.01",
            "6,1,2,-;NVRM: Xid (PCI:0000:01:00): pid=1",
            "6,1,2,-;virtio_net virtio1 eth0: renamed",
            "",
        ] {
            assert_eq!(parse_xid(other), None, "{other}");
        }
    }

    #[test]
    fn nvidia_gpus_are_display_or_3d_controllers_of_vendor_10de() {
        assert!(is_nvidia_gpu("0x10de\n", "0x030200\n"));
        assert!(is_nvidia_gpu("0x10DE", "0x030000"));
        // An NVSwitch (bridge class), a Mellanox NIC, a virtio GPU.
        assert!(!is_nvidia_gpu("0x10de", "0x068000"));
        assert!(!is_nvidia_gpu("0x15b3", "0x020700"));
        assert!(!is_nvidia_gpu("0x1af4", "0x030000"));
        let sys = tempfile::tempdir().unwrap();
        let add = |name: &str, vendor: &str, class: &str| {
            let dir = sys.path().join(name);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), vendor).unwrap();
            fs::write(dir.join("class"), class).unwrap();
        };
        add("0000:00:01.0", "0x1af4", "0x010000");
        assert!(!pci_has_nvidia_gpu(sys.path()));
        add("0000:00:02.0", "0x10de", "0x030200");
        assert!(pci_has_nvidia_gpu(sys.path()));
        assert!(!pci_has_nvidia_gpu(Path::new("/nonexistent")));
    }

    #[test]
    fn module_errors_name_the_first_failure() {
        let loaded = Loaded {
            requested: true,
            modules: vec![
                ModuleOutcome {
                    name: "nvidia".into(),
                    error: Some("No such device".into()),
                },
                ModuleOutcome {
                    name: "nvidia_uvm".into(),
                    error: Some("not tried: nvidia failed to load".into()),
                },
            ],
            ..Loaded::default()
        };
        assert_eq!(
            loaded.module_error().as_deref(),
            Some("nvidia: No such device")
        );
        assert!(loaded.loaded_modules().is_empty());
        let response = response(Err(loaded.module_error().unwrap_or_default()), &loaded);
        assert_eq!(response.driver_error, "nvidia: No such device");
        assert!(response.gpus.is_empty());
    }

    #[test]
    fn load_without_a_module_list_is_a_clear_error_and_off_loads_nothing() {
        if Path::new(MODULE_LIST).exists() {
            return; // A GPU image: nothing to show here.
        }
        let loaded = load(NvidiaMode::Load, "x");
        assert!(loaded.requested);
        let error = loaded.module_error().unwrap_or_default();
        assert!(
            error.contains("has no /etc/gpuvm/nvidia-modules.list"),
            "{error}"
        );
        assert!(loaded.modules.is_empty() && loaded.cdi.is_none());
        let off = load(NvidiaMode::Off, "x");
        assert!(!off.requested && off.module_error().is_none());
    }

    #[test]
    fn a_module_that_fails_stops_the_list_with_its_reason() {
        let entries = ["/nonexistent/nvidia.ko", "/nonexistent/nvidia-uvm.ko"].map(|path| {
            boot::ModuleEntry {
                path: path.into(),
                params: String::new(),
            }
        });
        let outcomes = load_list(&entries, "x");
        assert_eq!(outcomes[0].name, "nvidia");
        // What needs the failed module is not tried.
        assert_eq!(
            outcomes[1],
            ModuleOutcome {
                name: "nvidia_uvm".into(),
                error: Some("not tried: nvidia failed to load".into()),
            }
        );
        assert!(
            outcomes[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("No such file"),
            "{outcomes:?}"
        );
    }
}
