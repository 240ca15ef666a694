//! What PID 1 does before it serves: mount the API filesystems, load the kernel
//! modules shipped in the initramfs, bring up the network and mount the share.
//!
//! Parsers (kernel command line, module list) are pure; the rest are thin wrappers
//! over system calls that only make sense inside the guest.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::mount::{MsFlags, mount};

use crate::error::{Error, Result};

/// Where the virtio-fs share is mounted in the guest.
pub const SHARED_DIR: &str = "/run/gpuvm/shared";

/// Default module list inside the initramfs.
pub const DEFAULT_MODULE_LIST: &str = "/etc/gpuvm/modules.list";

/// An IPv4 configuration for one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Interface name, `eth0` unless given.
    pub interface: String,
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// Settings the agent takes from the kernel command line (`gpuvm.*` keys).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootConfig {
    /// `gpuvm.share=<tag>`: virtio-fs tag to mount at [`SHARED_DIR`].
    pub share_tag: Option<String>,
    /// `gpuvm.ip=<addr>/<prefix>[,<gateway>[,<ifname>]]`.
    pub ip: Option<IpConfig>,
    /// `gpuvm.listen=<ttrpc address>`, default `vsock://-1:1024`.
    pub listen: Option<String>,
    /// `gpuvm.modules=<path>`: module list file.
    pub module_list: Option<PathBuf>,
    /// `gpuvm.debug=1`: verbose logging.
    pub debug: bool,
    /// `gpuvm.nvidia=auto|load|off`: whether to load the NVIDIA kernel modules.
    pub nvidia: NvidiaMode,
}

/// `gpuvm.nvidia=`: when the agent loads the modules of
/// [`crate::nvidia::MODULE_LIST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NvidiaMode {
    /// Load them when an NVIDIA display or 3D controller is on the PCI bus.
    #[default]
    Auto,
    /// Always try (a GPU image booted without a GPU, as CI does).
    Load,
    /// Never.
    Off,
}

/// Parses the `gpuvm.*` keys of a kernel command line; other keys are ignored.
pub fn parse_cmdline(cmdline: &str) -> Result<BootConfig> {
    let mut config = BootConfig::default();
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "gpuvm.share" if !value.is_empty() => config.share_tag = Some(value.to_string()),
            "gpuvm.ip" => config.ip = Some(parse_ip(value)?),
            "gpuvm.listen" => config.listen = Some(value.to_string()),
            "gpuvm.modules" => config.module_list = Some(PathBuf::from(value)),
            "gpuvm.debug" => config.debug = value == "1" || value == "true",
            "gpuvm.nvidia" => {
                config.nvidia = match value {
                    "auto" => NvidiaMode::Auto,
                    "load" => NvidiaMode::Load,
                    "off" => NvidiaMode::Off,
                    _ => {
                        return Err(Error::invalid(format!(
                            "gpuvm.nvidia={value:?} is not auto, load or off"
                        )));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(config)
}

fn parse_ip(value: &str) -> Result<IpConfig> {
    let bad = || {
        Error::invalid(format!(
            "gpuvm.ip={value:?} is not <addr>/<prefix>[,<gateway>[,<ifname>]]"
        ))
    };
    let mut parts = value.split(',');
    let (address, prefix) = parts
        .next()
        .and_then(|a| a.split_once('/'))
        .ok_or_else(bad)?;
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    let gateway = match parts.next() {
        None | Some("") => None,
        Some(g) => Some(g.parse().map_err(|_| bad())?),
    };
    let interface = parts
        .next()
        .filter(|i| !i.is_empty())
        .unwrap_or("eth0")
        .to_string();
    Ok(IpConfig {
        interface,
        address,
        prefix,
        gateway,
    })
}

/// One line of the module list: a `.ko` path and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Absolute, or relative to `/lib/modules/<release>`.
    pub path: PathBuf,
    /// `key=value` parameters, space-separated.
    pub params: String,
}

/// Parses a module list: one module per line, `path [params...]`, `#` comments.
/// The order of the file is the load order (dependencies first).
pub fn parse_module_list(text: &str) -> Vec<ModuleEntry> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (path, params) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            ModuleEntry {
                path: PathBuf::from(path),
                params: params.trim().to_string(),
            }
        })
        .collect()
}

/// The module's name as the kernel knows it (`virtio_pci` for `.../virtio_pci.ko`).
pub fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    file.split('.').next().unwrap_or("").replace('-', "_")
}

/// Reads a module list; a missing file is `None`.
pub fn read_module_list(list: &Path) -> Result<Option<Vec<ModuleEntry>>> {
    match fs::read_to_string(list) {
        Ok(text) => Ok(Some(parse_module_list(&text))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("Reading {}", list.display()), e)),
    }
}

/// Inserts one module with `finit_module(2)`; one that is already loaded (or built
/// in) counts as loaded. Returns its name.
pub fn load_module(entry: &ModuleEntry, release: &str) -> Result<String> {
    let path = if entry.path.is_absolute() {
        entry.path.clone()
    } else {
        Path::new("/lib/modules").join(release).join(&entry.path)
    };
    let file = File::open(&path)
        .map_err(|e| Error::io(format!("Opening module {}", path.display()), e))?;
    let params = CString::new(entry.params.clone()).map_err(|_| {
        Error::invalid(format!(
            "the parameters of {} contain a NUL byte",
            path.display()
        ))
    })?;
    match finit_module(&file, &params, ModuleInitFlags::empty()) {
        Ok(()) | Err(Errno::EEXIST) => Ok(module_name(&path)),
        Err(e) => Err(Error::io(format!("Loading module {}", path.display()), e)),
    }
}

/// Loads every module of the list in order. Returns the names loaded; stops at the
/// first failure. A missing list loads nothing.
pub fn load_modules(list: &Path, release: &str) -> Result<Vec<String>> {
    read_module_list(list)?
        .unwrap_or_default()
        .iter()
        .map(|entry| load_module(entry, release))
        .collect()
}

/// Mounts the API filesystems PID 1 must provide. Already-mounted ones are fine.
pub fn mount_api_filesystems() -> Result<()> {
    let mounts: [(&str, &str, &str, MsFlags, &str); 8] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        fs::create_dir_all(target).map_err(|e| Error::io(format!("Creating {target}"), e))?;
        match mount(Some(source), target, Some(fstype), flags, Some(data)) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(Error::io(format!("Mounting {fstype} at {target}"), e)),
        }
    }
    // Userland expects these links; devtmpfs does not create them.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// Mounts the virtio-fs share `tag` at [`SHARED_DIR`].
pub fn mount_share(tag: &str) -> Result<PathBuf> {
    fs::create_dir_all(SHARED_DIR).map_err(|e| Error::io(format!("Creating {SHARED_DIR}"), e))?;
    mount(
        Some(tag),
        SHARED_DIR,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::io(format!("Mounting virtio-fs tag {tag} at {SHARED_DIR}"), e))?;
    Ok(PathBuf::from(SHARED_DIR))
}

fn inet_socket() -> Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("Opening a network control socket", e))
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
        return Err(Error::invalid(format!(
            "the interface name {name:?} is not valid"
        )));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) on Linux and
    // the kernel reads the address as sockaddr_in by its family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(fd: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq, what: &str) -> Result<()> {
    // SAFETY: every request used here reads or writes one `ifreq`, which `req` is,
    // valid and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(Error::io(what.to_string(), io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets an interface up.
pub fn link_up(name: &str) -> Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(
        &fd,
        libc::SIOCGIFFLAGS,
        &mut req,
        &format!("Reading the flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut req,
        &format!("Setting {name} up"),
    )
}

/// The kernel's `struct rtentry` (not in the libc crate for glibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Assigns an IPv4 address, brings the interface up and adds the default route.
pub fn configure_ip(config: &IpConfig) -> Result<()> {
    let name = &config.interface;
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(config.address);
    ioctl(
        &fd,
        libc::SIOCSIFADDR,
        &mut req,
        &format!("Setting the address of {name}"),
    )?;
    let mask = if config.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(config.prefix))
    };
    req.ifr_ifru.ifru_netmask = sockaddr_in(Ipv4Addr::from(mask));
    ioctl(
        &fd,
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("Setting the netmask of {name}"),
    )?;
    link_up(name)?;
    if let Some(gateway) = config.gateway {
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`, laid out as the kernel's.
        let rc =
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCADDRT, &mut route as *mut RtEntry) };
        if rc < 0 {
            return Err(Error::io(
                format!("Adding the default route via {gateway}"),
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_keys() {
        let config = parse_cmdline(
            "console=ttyS0 quiet gpuvm.share=rootfs gpuvm.ip=10.0.2.15/24,10.0.2.2 \
             gpuvm.listen=vsock://-1:2048 gpuvm.modules=/x.list gpuvm.debug=1 init=/init",
        )
        .unwrap();
        assert_eq!(
            config,
            BootConfig {
                share_tag: Some("rootfs".into()),
                ip: Some(IpConfig {
                    interface: "eth0".into(),
                    address: Ipv4Addr::new(10, 0, 2, 15),
                    prefix: 24,
                    gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                }),
                listen: Some("vsock://-1:2048".into()),
                module_list: Some("/x.list".into()),
                debug: true,
                nvidia: NvidiaMode::Auto,
            }
        );
        assert_eq!(
            parse_cmdline("console=ttyS0").unwrap(),
            BootConfig::default()
        );
    }

    #[test]
    fn nvidia_key() {
        for (value, mode) in [
            ("auto", NvidiaMode::Auto),
            ("load", NvidiaMode::Load),
            ("off", NvidiaMode::Off),
        ] {
            let config = parse_cmdline(&format!("quiet gpuvm.nvidia={value}")).unwrap();
            assert_eq!(config.nvidia, mode);
        }
        let err = parse_cmdline("gpuvm.nvidia=yes").unwrap_err();
        assert!(err.to_string().contains("not auto, load or off"), "{err}");
    }

    #[test]
    fn ip_forms() {
        let ip = parse_ip("192.168.1.2/16,,ens3").unwrap();
        assert_eq!(
            (ip.interface.as_str(), ip.prefix, ip.gateway),
            ("ens3", 16, None)
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "x/24", "10.0.0.1/24,gw"] {
            assert!(parse_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn module_list_order_comments_and_params() {
        let text = "# virtio first\nkernel/drivers/virtio/virtio.ko\n\n\
                    /abs/vsock.ko  # inline\nkernel/fs/fuse/fuse.ko max_user_bgreq=10 x=1\n";
        let list = parse_module_list(text);
        assert_eq!(
            list,
            vec![
                ModuleEntry {
                    path: "kernel/drivers/virtio/virtio.ko".into(),
                    params: String::new()
                },
                ModuleEntry {
                    path: "/abs/vsock.ko".into(),
                    params: String::new()
                },
                ModuleEntry {
                    path: "kernel/fs/fuse/fuse.ko".into(),
                    params: "max_user_bgreq=10 x=1".into()
                },
            ]
        );
        assert_eq!(
            module_name(Path::new("a/vmw_vsock_virtio_transport.ko")),
            "vmw_vsock_virtio_transport"
        );
        assert_eq!(module_name(Path::new("virtio-pci.ko.xz")), "virtio_pci");
    }

    #[test]
    fn a_missing_module_list_loads_nothing() {
        assert!(
            load_modules(Path::new("/nonexistent/modules.list"), "x")
                .unwrap()
                .is_empty()
        );
    }
}
