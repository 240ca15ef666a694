//! A container's mounts in the guest: the kernel filesystems of its OCI spec go to the
//! agent as they are, and every bind mount (the files kubelet and containerd prepare:
//! `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`, `/dev/termination-log`; the
//! directories of ConfigMaps, Secrets, the service-account token, emptyDirs,
//! hostPaths, PVCs) is shared over virtio-fs: its host source is bind-mounted into the
//! container's `volumes/` directory on the shim's side of the share, and the agent
//! binds it from there onto the destination in the container. Nothing is copied.
//!
//! [`plan_mounts`] decides (pure, table-tested); [`share_volumes`] makes the host
//! binds; [`remove_container_share`] is the one cleanup of a container's footprint in
//! the share (its rootfs and its volumes).
//!
//! On the host, each bind is a detached clone of the source (`open_tree`), given its
//! attributes before anyone can see it (`mount_setattr`: read-only where the spec says
//! `ro`, recursively; always `nosuid`, `nodev` and `nosymfollow`), then attached with
//! `move_mount` onto a mount point opened without symlinks. A guest therefore never
//! sees a read-only volume writable, not even for a moment, and no host process that
//! walks a path through the share follows a symlink the guest wrote into a volume.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{MoveMountFlags, OpenTreeFlags};

use crate::agent::Mount as AgentMount;
use crate::error::{Error, Result};

/// The guest's own `/dev/shm` (a tmpfs the agent mounts at boot), what a container's
/// `/dev/shm` bind becomes: every container of the pod shares it, as they share the
/// pod's IPC namespace under runc.
pub const GUEST_SHM: &str = "/dev/shm";

/// How a host bind takes part in mount propagation on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPropagation {
    /// Nothing mounted later under the source reaches the guest (`private`,
    /// `rprivate`, the default, and `unbindable`).
    Private,
    /// Mounts made later under the source on the host reach the share and the guest
    /// (`slave`, `rslave`; `shared`/`rshared` too, since no mount the guest makes can
    /// ever reach the host: it has its own kernel).
    Slave,
}

/// A host path to share with the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// The host path, as containerd or kubelet gave it.
    pub source: PathBuf,
    /// Its mount point's name in the container's `volumes/` directory.
    pub name: String,
    /// `rbind`: the mounts under the source come along.
    pub recursive: bool,
    /// `ro`: read-only on the host side already, so the guest cannot write it even
    /// with its agent compromised.
    pub read_only: bool,
    /// Propagation from the host into the guest.
    pub propagation: HostPropagation,
}

/// A container's mounts: the host binds the shim makes in the share, and every mount
/// the agent makes in the container, in the spec's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountPlan {
    /// Host paths bound into the container's `volumes/` directory.
    pub binds: Vec<HostBind>,
    /// The agent's mounts, in spec order (a file bind under the `/dev` tmpfs needs the
    /// tmpfs first).
    pub guest: Vec<AgentMount>,
}

/// Whether an OCI mount is a bind mount (`type: bind`, or a `bind`/`rbind` option with
/// any type, often `none`).
fn is_bind(mount: &oci_spec::runtime::Mount) -> bool {
    matches!(mount.typ().as_deref(), Some("bind" | "rbind"))
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The host side of a bind from its options: the last of `ro`/`rw` and of the
/// propagation options wins, as in mount(8).
fn host_bind(mount: &oci_spec::runtime::Mount, source: PathBuf, name: String) -> HostBind {
    let mut bind = HostBind {
        source,
        name,
        recursive: mount.typ().as_deref() == Some("rbind"),
        read_only: false,
        propagation: HostPropagation::Private,
    };
    for option in mount.options().iter().flatten() {
        match option.as_str() {
            "ro" => bind.read_only = true,
            "rw" => bind.read_only = false,
            "rbind" => bind.recursive = true,
            "slave" | "rslave" | "shared" | "rshared" => bind.propagation = HostPropagation::Slave,
            "private" | "rprivate" | "unbindable" | "runbindable" => {
                bind.propagation = HostPropagation::Private
            }
            _ => {}
        }
    }
    bind
}

fn agent_mount(mount: &oci_spec::runtime::Mount, fs_type: &str, source: String) -> AgentMount {
    AgentMount {
        destination: mount.destination().display().to_string(),
        fs_type: fs_type.to_owned(),
        source,
        options: mount.options().clone().unwrap_or_default(),
    }
}

/// Plans a container's mounts. `guest_volumes` is where the container's `volumes/`
/// directory is in the guest: the bind numbered `n` is `<guest_volumes>/<n>` there.
///
/// - Kernel filesystems (proc, sysfs, tmpfs, devpts, mqueue…) go to the agent as they
///   are; `cgroup` mounts and mounts without a type are left out (the guest has its
///   own cgroup2 hierarchy).
/// - A bind at `/dev/shm` (CRI's per-pod shm, or the host's with `hostIPC`) becomes a
///   bind of the guest's own `/dev/shm` ([`GUEST_SHM`]): memory the pod's containers
///   share, in the guest, not a host tmpfs over virtio-fs.
/// - Every other bind is a [`HostBind`] plus an agent bind from its place in the
///   share, with the spec's options (`ro`, `rbind`, propagation, `nosuid`…), which
///   the agent applies in the container's mount namespace.
///
/// A bind whose source is not an absolute path is an `InvalidArgument`.
pub fn plan_mounts(spec: &oci_spec::runtime::Spec, guest_volumes: &str) -> Result<MountPlan> {
    let mut plan = MountPlan::default();
    for mount in spec.mounts().iter().flatten() {
        if !is_bind(mount) {
            let fs_type = mount.typ().as_deref().unwrap_or("");
            if !fs_type.is_empty() && !fs_type.starts_with("cgroup") {
                let source = mount
                    .source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default();
                plan.guest.push(agent_mount(mount, fs_type, source));
            }
            continue;
        }
        if mount.destination() == Path::new(GUEST_SHM) {
            plan.guest
                .push(agent_mount(mount, "bind", GUEST_SHM.to_owned()));
            continue;
        }
        let source = match mount.source() {
            Some(source) if source.is_absolute() => source.clone(),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "the bind mount at {} has no absolute source path",
                    mount.destination().display()
                )));
            }
        };
        let name = plan.binds.len().to_string();
        let guest_source = format!("{guest_volumes}/{name}");
        let bind = host_bind(mount, source, name);
        // `type: rbind` carries the recursion the options may not spell out.
        let guest_type = if bind.recursive { "rbind" } else { "bind" };
        plan.binds.push(bind);
        plan.guest
            .push(agent_mount(mount, guest_type, guest_source));
    }
    Ok(plan)
}

/// Binds every planned host path into `dir` (a container's `volumes/` directory on
/// the shim's side of the share, created here without following symlinks). A source
/// must not resolve into any of `forbidden` (the share and the shim's run directory,
/// where guests write). Returns the mount points made, in the order to unmount them
/// (last made first). On failure, what was made stays under `dir` for
/// [`remove_container_share`] (the caller's one cleanup).
pub fn share_volumes(binds: &[HostBind], dir: &Path, forbidden: &[&Path]) -> Result<Vec<PathBuf>> {
    if binds.is_empty() {
        return Ok(Vec::new());
    }
    let parent = crate::host_path::create_dir_all(dir)?;
    let mut made = Vec::with_capacity(binds.len());
    for bind in binds {
        share_one(bind, &parent, forbidden)?;
        made.push(dir.join(&bind.name));
    }
    made.reverse();
    Ok(made)
}

/// Removes a container's footprint in the share (`mounts/<id>`: its rootfs mount and
/// its volumes): unmounts whatever `/proc/self/mountinfo` lists under `dir`, deepest
/// first and without following symlinks, then removes the directory, unless something
/// is still mounted there. The one cleanup of a container's mounts: at its delete,
/// and (through the work dir's) at teardown and `shim delete`.
pub fn remove_container_share(dir: &Path) {
    crate::rootfs::remove_dir_if_unmounted(dir);
}

fn io_error(context: String) -> impl FnOnce(Errno) -> Error {
    move |errno| Error::Io {
        context,
        source: errno.into(),
    }
}

/// Resolves, clones, sets up and attaches one host bind onto `<parent>/<name>`.
fn share_one(bind: &HostBind, parent: &OwnedFd, forbidden: &[&Path]) -> Result<()> {
    let (source, is_dir) = open_source(&bind.source, forbidden)?;
    let shown = bind.source.display();
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if bind.recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(&source, "", flags)
        .map_err(io_error(format!("cannot clone the mount of {shown}")))?;
    set_attributes(&tree, bind).map_err(io_error(format!("cannot set up the bind of {shown}")))?;
    let target = make_mount_point(parent, &bind.name, is_dir)?;
    rustix::mount::move_mount(
        &tree,
        "",
        &target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(io_error(format!(
        "cannot attach the bind of {shown} to the share"
    )))
}

/// Opens a bind's source (`O_PATH`) once; the bind is made from this descriptor, so
/// nothing can be swapped between the checks and the mount. The path is containerd's
/// or kubelet's and is resolved as written (an administrator's symlinked directory
/// keeps working, as under runc), but never through `/proc` magic links (into another
/// process's root), and it must not end inside `forbidden`. Returns the descriptor
/// and whether it is a directory; anything but a directory or a regular file is
/// refused (virtio-fs cannot carry a socket or a device into the VM).
fn open_source(source: &Path, forbidden: &[&Path]) -> Result<(OwnedFd, bool)> {
    let shown = source.display();
    let fd = rustix::fs::openat2(
        CWD,
        source,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        Errno::NOENT => Error::InvalidArgument(format!(
            "the source {shown} of a bind mount does not exist on the host"
        )),
        e => Error::Io {
            context: format!("cannot open the source {shown} of a bind mount"),
            source: e.into(),
        },
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(io_error(format!(
        "cannot stat the source {shown} of a bind mount"
    )))?;
    let is_dir = match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => true,
        FileType::RegularFile => false,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "the source {shown} of a bind mount is neither a file nor a directory: \
                 virtio-fs cannot carry it into the VM"
            )));
        }
    };
    let resolved = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(Error::io(format!("cannot tell where {shown} resolves to")))?;
    if let Some(place) = forbidden.iter().find(|place| resolved.starts_with(place)) {
        return Err(Error::InvalidArgument(format!(
            "the source {shown} of a bind mount resolves to {}, inside {}, where guests write",
            resolved.display(),
            place.display()
        )));
    }
    Ok((fd, is_dir))
}

/// `mount_setattr(2)` on the whole detached clone `tree`: read-only if asked,
/// `nosuid`, `nodev`, `nosymfollow`, and its propagation.
fn set_attributes(tree: &OwnedFd, bind: &HostBind) -> std::result::Result<(), Errno> {
    let mut attr_set =
        libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSYMFOLLOW;
    if bind.read_only {
        attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    let propagation = match bind.propagation {
        HostPropagation::Private => libc::MS_PRIVATE,
        HostPropagation::Slave => libc::MS_SLAVE,
    };
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation,
        userns_fd: 0,
    };
    let empty: &CStr = c"";
    // SAFETY: `tree` is an open descriptor for the call's duration, `empty` a valid
    // C string, and `attr` a `mount_attr` whose size is passed with it; the kernel
    // only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_fd().as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        ))
    }
}

/// Creates the mount point `name` in `parent` (a directory, or an empty file for a
/// file bind) and opens it without following symlinks.
fn make_mount_point(parent: &OwnedFd, name: &str, is_dir: bool) -> Result<OwnedFd> {
    let what = |e| Error::Io {
        context: format!("cannot make the mount point {name} of a volume in the share"),
        source: std::io::Error::from(e),
    };
    if is_dir {
        rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)).map_err(what)?;
    } else {
        rustix::fs::openat(
            parent,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(what)?;
    }
    rustix::fs::openat2(
        parent,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH,
    )
    .map_err(what)
}

#[cfg(test)]
mod tests {
    use super::HostPropagation::{Private, Slave};
    use super::*;

    fn spec(mounts: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.1.0", "mounts": mounts}))
            .expect("spec")
    }

    fn bind(source: &str, name: &str, recursive: bool, ro: bool, p: HostPropagation) -> HostBind {
        HostBind {
            source: source.into(),
            name: name.into(),
            recursive,
            read_only: ro,
            propagation: p,
        }
    }

    /// (destination, type, source) of each agent mount.
    fn guest(plan: &MountPlan) -> Vec<(String, String, String)> {
        plan.guest
            .iter()
            .map(|m| (m.destination.clone(), m.fs_type.clone(), m.source.clone()))
            .collect()
    }

    fn triples(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        list.iter()
            .map(|(d, t, s)| ((*d).to_owned(), (*t).to_owned(), (*s).to_owned()))
            .collect()
    }

    const V: &str = "/run/gpuvm/shared/c1/volumes";

    #[test]
    fn every_bind_mount_is_planned_in_spec_order() {
        // What containerd's CRI plugin makes of a Pod with kubelet's files, a Secret,
        // an emptyDir (HostToContainer), a hostPath (Bidirectional) and a PVC.
        type Case = (
            serde_json::Value,
            Vec<HostBind>,
            Vec<(&'static str, &'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (
                serde_json::json!([
                    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]},
                    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
                    {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/s1/shm",
                     "options": ["rbind", "rprivate", "rw"]},
                    {"destination": "/dev/termination-log", "type": "bind",
                     "source": "/var/lib/kubelet/pods/u/containers/app/t1", "options": ["rbind", "rprivate", "rw"]},
                    {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/u/etc-hosts",
                     "options": ["rbind", "rprivate", "rw"]},
                    {"destination": "/etc/resolv.conf", "type": "bind",
                     "source": "/var/lib/containerd/sandboxes/s1/resolv.conf", "options": ["rbind", "rprivate", "ro"]},
                    {"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
                     "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/token",
                     "options": ["rbind", "rprivate", "ro"]},
                    {"destination": "/cache", "type": "bind",
                     "source": "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache",
                     "options": ["rbind", "rslave", "rw"]},
                    {"destination": "/host", "type": "bind", "source": "/srv/data", "options": ["rbind", "rshared"]},
                    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
                ]),
                vec![
                    bind(
                        "/var/lib/kubelet/pods/u/containers/app/t1",
                        "0",
                        true,
                        false,
                        Private,
                    ),
                    bind(
                        "/var/lib/kubelet/pods/u/etc-hosts",
                        "1",
                        true,
                        false,
                        Private,
                    ),
                    bind(
                        "/var/lib/containerd/sandboxes/s1/resolv.conf",
                        "2",
                        true,
                        true,
                        Private,
                    ),
                    bind(
                        "/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/token",
                        "3",
                        true,
                        true,
                        Private,
                    ),
                    bind(
                        "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache",
                        "4",
                        true,
                        false,
                        Slave,
                    ),
                    bind("/srv/data", "5", true, false, Slave),
                ],
                vec![
                    ("/proc", "proc", "proc"),
                    ("/dev", "tmpfs", "tmpfs"),
                    ("/dev/shm", "bind", "/dev/shm"),
                    (
                        "/dev/termination-log",
                        "rbind",
                        "/run/gpuvm/shared/c1/volumes/0",
                    ),
                    ("/etc/hosts", "rbind", "/run/gpuvm/shared/c1/volumes/1"),
                    (
                        "/etc/resolv.conf",
                        "rbind",
                        "/run/gpuvm/shared/c1/volumes/2",
                    ),
                    (
                        "/var/run/secrets/kubernetes.io/serviceaccount",
                        "rbind",
                        "/run/gpuvm/shared/c1/volumes/3",
                    ),
                    ("/cache", "rbind", "/run/gpuvm/shared/c1/volumes/4"),
                    ("/host", "rbind", "/run/gpuvm/shared/c1/volumes/5"),
                ],
            ),
            (
                // `ctr run --mount type=bind,…,options=rbind:ro`; `type: none` with a
                // plain `bind` (not recursive); the last of ro/rw and of the
                // propagation options wins.
                serde_json::json!([
                    {"destination": "/mnt/demo", "type": "bind", "source": "/tmp/demo", "options": ["rbind", "ro"]},
                    {"destination": "/data", "type": "none", "source": "/srv/d", "options": ["bind", "ro", "rw"]},
                    {"destination": "/logs", "source": "/srv/l", "options": ["rbind", "rslave", "private"]},
                    {"destination": "/r", "type": "rbind", "source": "/srv/r", "options": ["ro"]}
                ]),
                vec![
                    bind("/tmp/demo", "0", true, true, Private),
                    bind("/srv/d", "1", false, false, Private),
                    bind("/srv/l", "2", true, false, Private),
                    bind("/srv/r", "3", true, true, Private),
                ],
                vec![
                    ("/mnt/demo", "rbind", "/run/gpuvm/shared/c1/volumes/0"),
                    ("/data", "bind", "/run/gpuvm/shared/c1/volumes/1"),
                    ("/logs", "rbind", "/run/gpuvm/shared/c1/volumes/2"),
                    ("/r", "rbind", "/run/gpuvm/shared/c1/volumes/3"),
                ],
            ),
            (serde_json::json!([]), vec![], vec![]),
        ];
        for (mounts, binds, want) in cases {
            let plan = plan_mounts(&spec(mounts.clone()), V).expect("plan");
            assert_eq!(plan.binds, binds, "{mounts}");
            assert_eq!(guest(&plan), triples(&want), "{mounts}");
        }
    }

    #[test]
    fn the_agent_gets_the_spec_s_options_for_each_bind() {
        let plan = plan_mounts(
            &spec(serde_json::json!([
                {"destination": "/secret", "type": "bind", "source": "/s",
                 "options": ["rbind", "rslave", "ro", "nosuid", "nodev", "noexec"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind", "ro"]}
            ])),
            V,
        )
        .expect("plan");
        assert_eq!(
            plan.guest[0].options,
            vec!["rbind", "rslave", "ro", "nosuid", "nodev", "noexec"]
        );
        assert_eq!(plan.guest[1].options, vec!["rbind", "ro"]);
        assert_eq!(plan.binds.len(), 1, "the shm bind stays in the guest");
    }

    #[test]
    fn a_bind_without_an_absolute_source_is_refused() {
        for source in [serde_json::json!("relative/path"), serde_json::json!(null)] {
            let err = plan_mounts(
                &spec(serde_json::json!([
                    {"destination": "/data", "type": "bind", "source": source, "options": ["rbind"]}
                ])),
                V,
            )
            .expect_err("refused");
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m == "the bind mount at /data has no absolute source path"),
                "{err}"
            );
        }
    }
}
