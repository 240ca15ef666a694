//! How a container's OCI mounts become the steps its child process performs.
//!
//! Planning is a pure function ([`plan_mounts`]): it turns the validated mounts into
//! an ordered list of [`Step`]s. Mounts are processed in spec order, and each mount
//! point is created right before its mount, after the mounts it lies under exist: the
//! default OCI spec mounts a tmpfs over `/dev` and then devpts at `/dev/pts`, so
//! `/dev/pts` can only be created inside that tmpfs. A tmpfs at `/dev` also gets the
//! standard device nodes and links (what runc adds), since nothing else provides them.
//!
//! Filesystem types the guest kernel does not know (say `mqueue` without its module)
//! are skipped with a warning; a bind mount whose source is missing fails the request.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::error::{Error, Result};
use crate::spec::{MountSpec, join_in_root};

/// What a bind mount's source is in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// It does not exist.
    Missing,
    /// A regular file (or anything else that is not a directory: a socket, a device).
    File,
    /// A directory.
    Dir,
}

impl SourceKind {
    /// Looks at `path` in the agent's view of the guest (symlinks followed).
    pub fn of(path: &Path) -> Self {
        match std::fs::metadata(path) {
            Err(_) => Self::Missing,
            Ok(meta) if meta.is_dir() => Self::Dir,
            Ok(_) => Self::File,
        }
    }
}

/// Facts about the guest the plan depends on.
#[derive(Debug, Clone, Default)]
pub struct GuestMounts {
    /// Filesystem types the kernel supports (`/proc/filesystems`); `None` when
    /// unknown, which lets every type through.
    pub filesystems: Option<BTreeSet<String>>,
    /// The guest runs the unified cgroup v2 hierarchy, so a `cgroup` (v1) mount is
    /// served by `cgroup2`, as runc does on such hosts.
    pub cgroup2: bool,
}

impl GuestMounts {
    /// Reads the facts from the running kernel.
    pub fn probe() -> Self {
        let filesystems = std::fs::read_to_string("/proc/filesystems")
            .ok()
            .map(|text| parse_filesystems(&text));
        let cgroup2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .unwrap_or(false);
        Self {
            filesystems,
            cgroup2,
        }
    }
}

/// The filesystem names of `/proc/filesystems` (`nodev\tproc`, `\text4`).
pub fn parse_filesystems(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

/// One thing the child does, in order, before `pivot_root`. Paths are guest paths
/// (under the container's rootfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `mkdir`; an existing entry is fine.
    MakeDir(PathBuf),
    /// Creates an empty file if nothing is there (the mount point of a file bind).
    MakeFile(PathBuf),
    /// `mount(2)`.
    Mount {
        /// Source, if any.
        source: Option<String>,
        /// Mount point.
        target: PathBuf,
        /// Filesystem type; `None` for a bind mount.
        fstype: Option<String>,
        /// Flags.
        flags: MsFlags,
        /// Filesystem options.
        data: String,
    },
    /// Makes a bind mount read-only (a bind ignores `MS_RDONLY` until remounted),
    /// keeping `flags` (nosuid, nodev, noexec).
    RemountReadOnly {
        /// The bind mount.
        target: PathBuf,
        /// Flags to keep.
        flags: MsFlags,
    },
    /// Sets the propagation of a mount.
    Propagation {
        /// The mount.
        target: PathBuf,
        /// `MS_PRIVATE`, `MS_SLAVE`, ... (with `MS_REC`).
        flags: MsFlags,
    },
    /// `mknod` of a character device, mode 0666.
    CharDevice {
        /// The node.
        path: PathBuf,
        /// Major number.
        major: u64,
        /// Minor number.
        minor: u64,
    },
    /// `symlink(target, link)`; an existing entry is fine.
    Symlink {
        /// What the link points to.
        target: PathBuf,
        /// The link.
        link: PathBuf,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MakeDir(path) => write!(f, "Creating the directory {}", path.display()),
            Self::MakeFile(path) => write!(f, "Creating the file {}", path.display()),
            Self::Mount {
                source,
                target,
                fstype,
                ..
            } => match fstype {
                Some(fstype) => write!(f, "Mounting {fstype} at {}", target.display()),
                None => write!(
                    f,
                    "Bind-mounting {} at {}",
                    source.as_deref().unwrap_or(""),
                    target.display()
                ),
            },
            Self::RemountReadOnly { target, .. } => {
                write!(f, "Making {} read-only", target.display())
            }
            Self::Propagation { target, .. } => {
                write!(f, "Setting the propagation of {}", target.display())
            }
            Self::CharDevice { path, .. } => write!(f, "Creating the device {}", path.display()),
            Self::Symlink { link, .. } => write!(f, "Creating the link {}", link.display()),
        }
    }
}

/// The planned steps, and warnings about mounts that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What the child does, in order.
    pub steps: Vec<Step>,
    /// One sentence per skipped mount.
    pub warnings: Vec<String>,
}

/// Character devices every container's `/dev` gets (runc's defaults).
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Links every container's `/dev` gets.
const DEFAULT_DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Plans the mounts of a container whose root is `rootfs` (a guest path).
pub fn plan_mounts(
    rootfs: &Path,
    mounts: &[MountSpec],
    guest: &GuestMounts,
    source_kind: impl Fn(&Path) -> SourceKind,
) -> Result<Plan> {
    let mut plan = Plan::default();
    for mount in mounts {
        let target = join_in_root(rootfs, &mount.destination);
        let mut fstype = mount.fstype.clone();
        let mut source = mount.source.clone();
        let mut data = mount.data.clone();
        if fstype.as_deref() == Some("cgroup") && guest.cgroup2 {
            // v1 options name controllers, which cgroup2 does not take.
            fstype = Some("cgroup2".into());
            source = "cgroup2".into();
            data.clear();
        }
        let is_file = match &fstype {
            None => match source_kind(Path::new(&source)) {
                SourceKind::Missing => {
                    return Err(Error::invalid(format!(
                        "the source {source} of the bind mount at {} does not exist in the guest",
                        mount.destination.display()
                    )));
                }
                SourceKind::File => true,
                SourceKind::Dir => false,
            },
            Some(fstype) => {
                if guest
                    .filesystems
                    .as_ref()
                    .is_some_and(|known| !known.contains(fstype))
                {
                    plan.warnings.push(format!(
                        "Skipping the {fstype} mount at {}: the guest kernel does not support {fstype}",
                        mount.destination.display()
                    ));
                    continue;
                }
                false
            }
        };

        // Every directory from the rootfs down, each created after the mounts above
        // it, so a mount point inside an earlier mount is made in that mount.
        let mut dir = rootfs.to_path_buf();
        let components: Vec<_> = mount.destination.components().skip(1).collect();
        let dirs = if is_file {
            components.len().saturating_sub(1)
        } else {
            components.len()
        };
        for component in &components[..dirs] {
            dir.push(component);
            plan.steps.push(Step::MakeDir(dir.clone()));
        }
        if is_file {
            plan.steps.push(Step::MakeFile(target.clone()));
        }

        let bind = fstype.is_none();
        plan.steps.push(Step::Mount {
            source: (!source.is_empty()).then(|| source.clone()),
            target: target.clone(),
            fstype: fstype.clone(),
            flags: mount.flags,
            data,
        });
        if bind && mount.flags.contains(MsFlags::MS_RDONLY) {
            plan.steps.push(Step::RemountReadOnly {
                target: target.clone(),
                flags: mount.flags & (MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC),
            });
        }
        if !mount.propagation.is_empty() {
            plan.steps.push(Step::Propagation {
                target: target.clone(),
                flags: mount.propagation,
            });
        }
        if mount.destination == Path::new("/dev") && fstype.as_deref() == Some("tmpfs") {
            for (name, major, minor) in DEFAULT_DEVICES {
                plan.steps.push(Step::CharDevice {
                    path: target.join(name),
                    major,
                    minor,
                });
            }
            for (name, points_to) in DEFAULT_DEV_LINKS {
                plan.steps.push(Step::Symlink {
                    target: PathBuf::from(points_to),
                    link: target.join(name),
                });
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::mount_spec;
    use gpuvm_protocol::agent;

    fn mount(dest: &str, type_: &str, source: &str, options: &[&str]) -> MountSpec {
        mount_spec(&agent::Mount {
            destination: dest.into(),
            type_: type_.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    /// The mounts of containerd's default OCI spec (ctr and CRI), in its order.
    fn containerd_default_mounts() -> Vec<MountSpec> {
        vec![
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount(
                "/dev",
                "tmpfs",
                "tmpfs",
                &["nosuid", "strictatime", "mode=755", "size=65536k"],
            ),
            mount(
                "/dev/pts",
                "devpts",
                "devpts",
                &[
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            ),
            mount(
                "/dev/shm",
                "tmpfs",
                "shm",
                &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            ),
            mount(
                "/dev/mqueue",
                "mqueue",
                "mqueue",
                &["nosuid", "noexec", "nodev"],
            ),
            mount(
                "/sys",
                "sysfs",
                "sysfs",
                &["nosuid", "noexec", "nodev", "ro"],
            ),
            mount(
                "/sys/fs/cgroup",
                "cgroup",
                "cgroup",
                &["nosuid", "noexec", "nodev", "relatime", "ro"],
            ),
        ]
    }

    fn position(plan: &Plan, wanted: &Step) -> usize {
        plan.steps
            .iter()
            .position(|s| s == wanted)
            .unwrap_or_else(|| panic!("{wanted:?} is not in {:#?}", plan.steps))
    }

    fn mount_of(plan: &Plan, target: &str) -> usize {
        plan.steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target: t, .. } if t == Path::new(target)))
            .unwrap_or_else(|| panic!("no mount at {target} in {:#?}", plan.steps))
    }

    fn all_filesystems() -> GuestMounts {
        GuestMounts {
            filesystems: Some(parse_filesystems(
                "nodev\tsysfs\nnodev\ttmpfs\nnodev\tproc\nnodev\tdevpts\nnodev\tcgroup\n\
                 nodev\tcgroup2\nnodev\tmqueue\n\text4\n",
            )),
            cgroup2: true,
        }
    }

    #[test]
    fn mount_points_are_created_after_the_mounts_they_lie_in() {
        let plan = plan_mounts(
            Path::new("/r"),
            &containerd_default_mounts(),
            &all_filesystems(),
            |_| SourceKind::Dir,
        )
        .unwrap();
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
        let dev = mount_of(&plan, "/r/dev");
        for inner in ["/r/dev/pts", "/r/dev/shm", "/r/dev/mqueue"] {
            let mkdir = position(&plan, &Step::MakeDir(inner.into()));
            assert!(dev < mkdir, "{inner} is created before /dev is mounted");
            assert!(mkdir < mount_of(&plan, inner));
        }
        let sys = mount_of(&plan, "/r/sys");
        assert!(sys < position(&plan, &Step::MakeDir("/r/sys/fs/cgroup".into())));
        // Spec order is kept.
        let order: Vec<usize> = ["/r/proc", "/r/dev", "/r/dev/pts", "/r/dev/shm"]
            .iter()
            .map(|t| mount_of(&plan, t))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // The /dev tmpfs gets devices and links after it is mounted, /dev/ptmx among them.
        let null = position(
            &plan,
            &Step::CharDevice {
                path: "/r/dev/null".into(),
                major: 1,
                minor: 3,
            },
        );
        assert!(dev < null);
        position(
            &plan,
            &Step::Symlink {
                target: "pts/ptmx".into(),
                link: "/r/dev/ptmx".into(),
            },
        );
    }

    #[test]
    fn cgroup_v1_becomes_cgroup2_on_a_unified_guest() {
        let plan = plan_mounts(
            Path::new("/r"),
            &containerd_default_mounts(),
            &all_filesystems(),
            |_| SourceKind::Dir,
        )
        .unwrap();
        let Step::Mount {
            fstype,
            source,
            data,
            flags,
            ..
        } = &plan.steps[mount_of(&plan, "/r/sys/fs/cgroup")]
        else {
            unreachable!()
        };
        assert_eq!(
            (fstype.as_deref(), source.as_deref(), data.as_str()),
            (Some("cgroup2"), Some("cgroup2"), "")
        );
        assert!(flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn unsupported_types_are_skipped_with_a_warning() {
        let mut guest = all_filesystems();
        if let Some(known) = guest.filesystems.as_mut() {
            known.remove("mqueue");
        }
        let plan = plan_mounts(
            Path::new("/r"),
            &containerd_default_mounts(),
            &guest,
            |_| SourceKind::Dir,
        )
        .unwrap();
        assert_eq!(plan.warnings.len(), 1);
        assert!(plan.warnings[0].contains("mqueue"), "{:?}", plan.warnings);
        assert!(!plan.steps.iter().any(|s| matches!(s,
            Step::Mount { target, .. } | Step::MakeDir(target) if target.ends_with("mqueue"))));
        // Unknown filesystems list: nothing is skipped.
        let plan = plan_mounts(
            Path::new("/r"),
            &containerd_default_mounts(),
            &GuestMounts::default(),
            |_| SourceKind::Dir,
        )
        .unwrap();
        assert!(plan.warnings.is_empty());
        mount_of(&plan, "/r/dev/mqueue");
    }

    #[test]
    fn binds_of_files_get_a_file_and_read_only_binds_a_remount() {
        let mounts = vec![
            mount(
                "/etc/resolv.conf",
                "bind",
                "/run/x/resolv.conf",
                &["rbind", "ro", "nosuid"],
            ),
            mount("/data", "none", "/run/x/data", &["bind", "rprivate"]),
        ];
        let plan = plan_mounts(Path::new("/r"), &mounts, &all_filesystems(), |p| {
            if p.ends_with("resolv.conf") {
                SourceKind::File
            } else {
                SourceKind::Dir
            }
        })
        .unwrap();
        assert_eq!(
            plan.steps,
            vec![
                Step::MakeDir("/r/etc".into()),
                Step::MakeFile("/r/etc/resolv.conf".into()),
                Step::Mount {
                    source: Some("/run/x/resolv.conf".into()),
                    target: "/r/etc/resolv.conf".into(),
                    fstype: None,
                    flags: MsFlags::MS_BIND
                        | MsFlags::MS_REC
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID,
                    data: String::new(),
                },
                Step::RemountReadOnly {
                    target: "/r/etc/resolv.conf".into(),
                    flags: MsFlags::MS_NOSUID,
                },
                Step::MakeDir("/r/data".into()),
                Step::Mount {
                    source: Some("/run/x/data".into()),
                    target: "/r/data".into(),
                    fstype: None,
                    flags: MsFlags::MS_BIND,
                    data: String::new(),
                },
                Step::Propagation {
                    target: "/r/data".into(),
                    flags: MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                },
            ]
        );
    }

    #[test]
    fn a_bind_of_a_missing_source_fails_clearly() {
        let err = plan_mounts(
            Path::new("/r"),
            &[mount("/data", "bind", "/nowhere", &["rbind"])],
            &all_filesystems(),
            |_| SourceKind::Missing,
        )
        .unwrap_err();
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(
            err.to_string()
                .contains("the source /nowhere of the bind mount at /data does not exist"),
            "{err}"
        );
    }

    #[test]
    fn steps_read_as_sentences() {
        assert_eq!(
            Step::Mount {
                source: Some("devpts".into()),
                target: "/r/dev/pts".into(),
                fstype: Some("devpts".into()),
                flags: MsFlags::empty(),
                data: String::new(),
            }
            .to_string(),
            "Mounting devpts at /r/dev/pts"
        );
    }
}
