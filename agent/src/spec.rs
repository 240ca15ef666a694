//! Translation of protocol requests into validated process and container specs.
//!
//! Everything here is pure: the request is checked once, and the spawn code only ever
//! sees values it can use without further checks.

use std::path::{Component, Path, PathBuf};

use gpuvm_protocol::agent;
use nix::mount::MsFlags;
use nix::sys::resource::Resource;

use crate::error::{Error, Result};
use crate::security::{self, CapabilitySets, Namespaces, SeccompFilters};

/// One resource limit, as `setrlimit(2)` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// The limited resource.
    pub resource: Resource,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
}

/// A process to run, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// argv; never empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs, split.
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the container.
    pub cwd: PathBuf,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Resource limits to apply before exec.
    pub rlimits: Vec<Rlimit>,
    /// Run on a pseudo-terminal.
    pub terminal: bool,
    /// Initial terminal size, if given.
    pub console_size: Option<ConsoleSize>,
    /// The capability sets; `None` keeps the agent's (all of them).
    pub capabilities: Option<CapabilitySets>,
    /// Set `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// The file mode creation mask; `None` is 0022.
    pub umask: Option<u32>,
}

impl ProcessSpec {
    /// The value of `PATH` in the process environment, if set.
    pub fn path_env(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(key, _)| key == "PATH")
            .map(|(_, value)| value.as_str())
    }
}

/// A mount inside a container, validated and split into flags and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute, normalised path inside the container.
    pub destination: PathBuf,
    /// Filesystem type; `None` for bind mounts.
    pub fstype: Option<String>,
    /// Mount source (device, directory or a free-form name such as `proc`).
    pub source: String,
    /// Flags for the `mount(2)` call itself.
    pub flags: MsFlags,
    /// Propagation to set afterwards (`MS_PRIVATE`, `MS_SLAVE`, ...), if any.
    pub propagation: MsFlags,
    /// Filesystem-specific options, comma-separated.
    pub data: String,
}

impl MountSpec {
    /// Whether this is a bind mount (which needs a remount to become read-only).
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
}

/// A container's filesystem view, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Absolute guest path of the root filesystem; `None` runs in the guest's root.
    pub rootfs: Option<PathBuf>,
    /// Make the root filesystem read-only.
    pub readonly_rootfs: bool,
    /// Mounts, in order.
    pub mounts: Vec<MountSpec>,
    /// The seccomp filter of every process in the container.
    pub seccomp: Option<SeccompFilters>,
    /// Its pid, ipc and uts namespaces.
    pub namespaces: Namespaces,
    /// What its cgroup's interface files get (OCI `linux.resources`).
    pub limits: Vec<crate::cgroup::Limit>,
    /// The NVIDIA driver injected into it (device nodes, libraries), if any: applied
    /// after `mounts`.
    pub gpu: Option<crate::cdi::ContainerEdits>,
}

/// Mounts a container gets when the request names none.
pub fn default_mounts() -> Vec<MountSpec> {
    vec![
        MountSpec {
            destination: PathBuf::from("/proc"),
            fstype: Some("proc".into()),
            source: "proc".into(),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            propagation: MsFlags::empty(),
            data: String::new(),
        },
        MountSpec {
            destination: PathBuf::from("/dev"),
            fstype: None,
            source: "/dev".into(),
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            propagation: MsFlags::empty(),
            data: String::new(),
        },
    ]
}

/// Validates a container request.
pub fn container_spec(req: &agent::CreateProcessRequest) -> Result<(ContainerSpec, ProcessSpec)> {
    check_id("container id", &req.container_id)?;
    let rootfs = if req.rootfs.is_empty() {
        None
    } else {
        let rootfs = PathBuf::from(&req.rootfs);
        if !rootfs.is_absolute() {
            return Err(Error::invalid(format!(
                "the rootfs {:?} is not an absolute path",
                req.rootfs
            )));
        }
        Some(rootfs)
    };
    let mounts = if req.mounts.is_empty() {
        if rootfs.is_some() {
            default_mounts()
        } else {
            Vec::new()
        }
    } else {
        if rootfs.is_none() {
            return Err(Error::invalid(
                "mounts need a rootfs: without one the process shares the guest's mounts",
            ));
        }
        req.mounts.iter().map(mount_spec).collect::<Result<_>>()?
    };
    let process = process_spec(req.process.as_ref())?;
    let seccomp = req
        .seccomp
        .as_ref()
        .map(security::seccomp_filters)
        .transpose()?;
    let namespaces = security::namespaces(&req.namespaces)?;
    let limits = match req.resources.as_ref() {
        Some(resources) => crate::cgroup::limits(resources)?,
        None => Vec::new(),
    };
    Ok((
        ContainerSpec {
            rootfs,
            readonly_rootfs: req.readonly_rootfs,
            mounts,
            seccomp,
            namespaces,
            limits,
            gpu: None,
        },
        process,
    ))
}

/// Checks a container or exec id: non-empty, printable, no path separators.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("the {what} is empty")));
    }
    // Ids name cgroup directories in the guest: `.` and `..` would name others.
    if id.len() > 256 || id == "." || id == ".." || id.chars().any(|c| c == '/' || c.is_control()) {
        return Err(Error::invalid(format!("the {what} {id:?} is not valid")));
    }
    Ok(())
}

/// Validates a process description.
pub fn process_spec(process: Option<&agent::ProcessSpec>) -> Result<ProcessSpec> {
    let process = process.ok_or_else(|| Error::invalid("the request has no process"))?;
    if process.args.is_empty() || process.args[0].is_empty() {
        return Err(Error::invalid("the process has no command (args is empty)"));
    }
    if process.args.iter().any(|a| a.contains('\0')) {
        return Err(Error::invalid("a process argument contains a NUL byte"));
    }
    let env = process
        .env
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() && !entry.contains('\0') => {
                Ok((key.to_string(), value.to_string()))
            }
            _ => Err(Error::invalid(format!(
                "the environment entry {entry:?} is not KEY=VALUE"
            ))),
        })
        .collect::<Result<_>>()?;
    let cwd = if process.cwd.is_empty() {
        PathBuf::from("/")
    } else {
        absolute_clean(&process.cwd, "working directory")?
    };
    let rlimits = process
        .rlimits
        .iter()
        .map(|r| {
            if r.soft > r.hard {
                return Err(Error::invalid(format!(
                    "the soft limit of {} is above its hard limit",
                    r.type_
                )));
            }
            Ok(Rlimit {
                resource: rlimit_resource(&r.type_)?,
                soft: r.soft,
                hard: r.hard,
            })
        })
        .collect::<Result<_>>()?;
    let console_size = process.console_size.as_ref().and_then(|size| {
        let rows = u16::try_from(size.rows).ok()?;
        let columns = u16::try_from(size.columns).ok()?;
        (rows > 0 && columns > 0).then_some(ConsoleSize { rows, columns })
    });
    if let Some(umask) = process.umask
        && umask > 0o777
    {
        return Err(Error::invalid(format!(
            "the umask {umask:#o} has bits beyond 0777"
        )));
    }
    let capabilities = process.capabilities.as_ref().map(|caps| {
        let (sets, unknown) = security::capability_sets(caps);
        for name in unknown {
            tracing::warn!("Skipping the capability {name:?}: it is not known to the agent");
        }
        sets
    });
    Ok(ProcessSpec {
        args: process.args.clone(),
        env,
        cwd,
        uid: process.uid,
        gid: process.gid,
        additional_gids: process.additional_gids.clone(),
        rlimits,
        terminal: process.terminal,
        console_size,
        capabilities,
        no_new_privileges: process.no_new_privileges,
        umask: process.umask,
    })
}

/// Maps an OCI rlimit name (`RLIMIT_NOFILE`) to the resource.
pub fn rlimit_resource(name: &str) -> Result<Resource> {
    Ok(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        other => {
            return Err(Error::invalid(format!(
                "the resource limit {other:?} is not known"
            )));
        }
    })
}

/// Validates one OCI mount.
pub fn mount_spec(mount: &agent::Mount) -> Result<MountSpec> {
    let destination = absolute_clean(&mount.destination, "mount destination")?;
    if destination == Path::new("/") {
        return Err(Error::invalid(
            "a mount cannot replace the container's root",
        ));
    }
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for option in &mount.options {
        match mount_option(option) {
            Some(MountOption::Set(flag)) => flags |= flag,
            Some(MountOption::Clear(flag)) => flags &= !flag,
            Some(MountOption::Propagation(flag)) => propagation = flag,
            None => data.push(option.as_str()),
        }
    }
    let fstype = match mount.type_.as_str() {
        "bind" | "rbind" | "" => {
            if mount.type_ == "rbind" {
                flags |= MsFlags::MS_REC;
            }
            if !flags.contains(MsFlags::MS_BIND) && mount.type_.is_empty() {
                return Err(Error::invalid(format!(
                    "the mount at {} has neither a type nor a bind option",
                    mount.destination
                )));
            }
            flags |= MsFlags::MS_BIND;
            None
        }
        other => Some(other.to_string()),
    };
    if fstype.is_some() && flags.contains(MsFlags::MS_BIND) {
        // OCI specs often carry `type: none` or the real type together with `bind`.
        return Ok(MountSpec {
            destination,
            fstype: None,
            source: mount.source.clone(),
            flags,
            propagation,
            data: data.join(","),
        });
    }
    Ok(MountSpec {
        destination,
        fstype,
        source: mount.source.clone(),
        flags,
        propagation,
        data: data.join(","),
    })
}

enum MountOption {
    Set(MsFlags),
    Clear(MsFlags),
    Propagation(MsFlags),
}

fn mount_option(option: &str) -> Option<MountOption> {
    use MountOption::{Clear, Propagation, Set};
    Some(match option {
        "ro" => Set(MsFlags::MS_RDONLY),
        "rw" => Clear(MsFlags::MS_RDONLY),
        "nosuid" => Set(MsFlags::MS_NOSUID),
        "suid" => Clear(MsFlags::MS_NOSUID),
        "nodev" => Set(MsFlags::MS_NODEV),
        "dev" => Clear(MsFlags::MS_NODEV),
        "noexec" => Set(MsFlags::MS_NOEXEC),
        "exec" => Clear(MsFlags::MS_NOEXEC),
        "sync" => Set(MsFlags::MS_SYNCHRONOUS),
        "async" => Clear(MsFlags::MS_SYNCHRONOUS),
        "dirsync" => Set(MsFlags::MS_DIRSYNC),
        "mand" => Set(MsFlags::MS_MANDLOCK),
        "nomand" => Clear(MsFlags::MS_MANDLOCK),
        "noatime" => Set(MsFlags::MS_NOATIME),
        "atime" => Clear(MsFlags::MS_NOATIME),
        "nodiratime" => Set(MsFlags::MS_NODIRATIME),
        "diratime" => Clear(MsFlags::MS_NODIRATIME),
        "relatime" => Set(MsFlags::MS_RELATIME),
        "norelatime" => Clear(MsFlags::MS_RELATIME),
        "strictatime" => Set(MsFlags::MS_STRICTATIME),
        "bind" => Set(MsFlags::MS_BIND),
        "rbind" => Set(MsFlags::MS_BIND | MsFlags::MS_REC),
        "private" => Propagation(MsFlags::MS_PRIVATE),
        "rprivate" => Propagation(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "shared" => Propagation(MsFlags::MS_SHARED),
        "rshared" => Propagation(MsFlags::MS_SHARED | MsFlags::MS_REC),
        "slave" => Propagation(MsFlags::MS_SLAVE),
        "rslave" => Propagation(MsFlags::MS_SLAVE | MsFlags::MS_REC),
        "unbindable" => Propagation(MsFlags::MS_UNBINDABLE),
        "runbindable" => Propagation(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC),
        _ => return None,
    })
}

/// Checks that `path` is absolute and normalises it; `..` is refused so a path can
/// never leave the container root by construction.
fn absolute_clean(path: &str, what: &str) -> Result<PathBuf> {
    let raw = Path::new(path);
    if !raw.is_absolute() || path.contains('\0') {
        return Err(Error::invalid(format!(
            "the {what} {path:?} is not an absolute path"
        )));
    }
    let mut clean = PathBuf::from("/");
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::invalid(format!("the {what} {path:?} contains `..`")));
            }
        }
    }
    Ok(clean)
}

/// Joins a validated absolute container path onto a host-side root directory.
pub fn join_in_root(root: &Path, inside: &Path) -> PathBuf {
    match inside.strip_prefix("/") {
        Ok(relative) => root.join(relative),
        Err(_) => root.join(inside),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(args: &[&str]) -> agent::ProcessSpec {
        agent::ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin:/usr/bin".into(), "EMPTY=".into(), "A=b=c".into()],
            ..Default::default()
        }
    }

    fn mount(dest: &str, type_: &str, source: &str, options: &[&str]) -> agent::Mount {
        agent::Mount {
            destination: dest.into(),
            type_: type_.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn process_spec_defaults_and_env_split() {
        let spec = process_spec(Some(&process(&["sh", "-c", "true"]))).unwrap();
        assert_eq!(spec.cwd, PathBuf::from("/"));
        assert_eq!(spec.path_env(), Some("/bin:/usr/bin"));
        assert_eq!(spec.env[1], ("EMPTY".into(), "".into()));
        assert_eq!(spec.env[2], ("A".into(), "b=c".into()));
        assert_eq!(spec.console_size, None);
    }

    #[test]
    fn process_spec_rejects_bad_input() {
        let cases: Vec<(agent::ProcessSpec, &str)> = vec![
            (process(&[]), "no command"),
            (process(&[""]), "no command"),
            (
                agent::ProcessSpec {
                    env: vec!["NOEQUALS".into()],
                    ..process(&["x"])
                },
                "KEY=VALUE",
            ),
            (
                agent::ProcessSpec {
                    cwd: "relative".into(),
                    ..process(&["x"])
                },
                "not an absolute path",
            ),
            (
                agent::ProcessSpec {
                    cwd: "/a/../../etc".into(),
                    ..process(&["x"])
                },
                "`..`",
            ),
            (
                agent::ProcessSpec {
                    rlimits: vec![agent::Rlimit {
                        type_: "RLIMIT_BOGUS".into(),
                        ..Default::default()
                    }],
                    ..process(&["x"])
                },
                "not known",
            ),
            (
                agent::ProcessSpec {
                    rlimits: vec![agent::Rlimit {
                        type_: "RLIMIT_NOFILE".into(),
                        soft: 10,
                        hard: 5,
                        ..Default::default()
                    }],
                    ..process(&["x"])
                },
                "above its hard limit",
            ),
        ];
        for (input, expected) in cases {
            let err = process_spec(Some(&input)).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
        assert!(process_spec(None).is_err());
    }

    #[test]
    fn rlimits_and_console_size_translate() {
        let spec = process_spec(Some(&agent::ProcessSpec {
            rlimits: vec![agent::Rlimit {
                type_: "RLIMIT_NOFILE".into(),
                soft: 1024,
                hard: 4096,
                ..Default::default()
            }],
            terminal: true,
            console_size: protobuf::MessageField::some(agent::ConsoleSize {
                rows: 24,
                columns: 80,
                ..Default::default()
            }),
            uid: 1000,
            gid: 100,
            additional_gids: vec![10, 20],
            ..process(&["x"])
        }))
        .unwrap();
        assert_eq!(
            spec.rlimits,
            vec![Rlimit {
                resource: Resource::RLIMIT_NOFILE,
                soft: 1024,
                hard: 4096
            }]
        );
        assert_eq!(
            spec.console_size,
            Some(ConsoleSize {
                rows: 24,
                columns: 80
            })
        );
        assert_eq!(
            (spec.uid, spec.gid, spec.additional_gids),
            (1000, 100, vec![10, 20])
        );
    }

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let m = mount_spec(&mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ))
        .unwrap();
        assert_eq!(m.fstype.as_deref(), Some("tmpfs"));
        assert_eq!(
            m.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV
        );
        assert_eq!(m.data, "mode=1777,size=65536k");

        let b = mount_spec(&mount(
            "/etc/hosts",
            "bind",
            "/run/x/hosts",
            &["rbind", "rprivate", "ro"],
        ))
        .unwrap();
        assert!(b.is_bind());
        assert_eq!(b.fstype, None);
        assert!(b.flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_REC));
        assert_eq!(b.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);

        // `type: none` with a bind option is a bind mount.
        let n = mount_spec(&mount("/data", "none", "/src", &["bind", "rw"])).unwrap();
        assert!(n.is_bind() && n.fstype.is_none());
    }

    #[test]
    fn mounts_are_validated() {
        assert!(mount_spec(&mount("relative", "tmpfs", "t", &[])).is_err());
        assert!(mount_spec(&mount("/", "tmpfs", "t", &[])).is_err());
        assert!(mount_spec(&mount("/a/../..", "tmpfs", "t", &[])).is_err());
        assert!(mount_spec(&mount("/x", "", "t", &[])).is_err());
        let m = mount_spec(&mount("//a/./b/", "tmpfs", "t", &[])).unwrap();
        assert_eq!(m.destination, PathBuf::from("/a/b"));
    }

    #[test]
    fn container_spec_defaults() {
        let req = agent::CreateProcessRequest {
            container_id: "c1".into(),
            rootfs: "/run/gpuvm/shared/c1/rootfs".into(),
            process: protobuf::MessageField::some(process(&["sh"])),
            ..Default::default()
        };
        let (container, _) = container_spec(&req).unwrap();
        assert_eq!(container.mounts, default_mounts());

        let no_rootfs = agent::CreateProcessRequest {
            rootfs: String::new(),
            ..req.clone()
        };
        assert!(container_spec(&no_rootfs).unwrap().0.mounts.is_empty());

        for id in ["a/b", ".", "..", ""] {
            let bad_id = agent::CreateProcessRequest {
                container_id: id.into(),
                ..req.clone()
            };
            assert!(container_spec(&bad_id).is_err(), "{id:?}");
        }
        let relative = agent::CreateProcessRequest {
            rootfs: "rootfs".into(),
            ..req
        };
        assert!(container_spec(&relative).is_err());
    }

    #[test]
    fn security_fields_translate_and_are_checked() {
        let spec = process_spec(Some(&agent::ProcessSpec {
            capabilities: protobuf::MessageField::some(agent::Capabilities {
                bounding: vec!["CAP_KILL".into()],
                ..Default::default()
            }),
            no_new_privileges: true,
            umask: Some(0o027),
            ..process(&["x"])
        }))
        .unwrap();
        let caps = spec.capabilities.unwrap();
        assert_eq!((caps.bounding, caps.effective), (1 << 5, 0));
        assert!(spec.no_new_privileges);
        assert_eq!(spec.umask, Some(0o027));
        // Unset capabilities keep the agent's; an empty message drops them all.
        assert_eq!(
            process_spec(Some(&process(&["x"]))).unwrap().capabilities,
            None
        );
        let err = process_spec(Some(&agent::ProcessSpec {
            umask: Some(0o1777),
            ..process(&["x"])
        }))
        .unwrap_err();
        assert!(err.to_string().contains("beyond 0777"), "{err}");

        let req = agent::CreateProcessRequest {
            container_id: "c1".into(),
            rootfs: "/r".into(),
            process: protobuf::MessageField::some(process(&["sh"])),
            seccomp: protobuf::MessageField::some(agent::Seccomp {
                default_action: "SCMP_ACT_ERRNO".into(),
                ..Default::default()
            }),
            namespaces: vec![agent::Namespace {
                type_: "pid".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (container, _) = container_spec(&req).unwrap();
        assert!(container.seccomp.is_some_and(|s| !s.programs.is_empty()));
        assert_eq!(container.namespaces.pid, security::NamespaceMode::New);
        let bad = agent::CreateProcessRequest {
            namespaces: vec![agent::Namespace {
                type_: "network".into(),
                ..Default::default()
            }],
            ..req
        };
        assert!(container_spec(&bad).is_err());
    }

    #[test]
    fn join_in_root_stays_inside() {
        assert_eq!(
            join_in_root(Path::new("/r"), Path::new("/proc")),
            PathBuf::from("/r/proc")
        );
    }
}
