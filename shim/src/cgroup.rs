//! The pod's cgroup on the host. The sandbox's OCI spec names it in
//! `linux.cgroupsPath`, and every process the shim starts for the VM (the VMM,
//! virtiofsd, vhost-device-vsock) joins it before exec, so the kubelet, `kubectl top`
//! and eviction see the VM's real memory, charged from its first page.
//!
//! containerd writes the path in one of two forms: a cgroupfs path
//! (`/kubepods/burstable/pod<uid>/<id>`) or systemd's `slice:prefix:name`
//! (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, which is
//! `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`).
//! Both name the same directory in every mounted hierarchy: the one cgroup2 tree, or
//! each cgroup v1 hierarchy (and the unified one of a hybrid host). The directory is
//! created where missing, as runc does for a sandbox, written directly to cgroupfs
//! (no systemd D-Bus), and what the shim created is removed at teardown.
//!
//! Parsing and placing are pure functions ([`parse_cgroups_path`], [`hierarchies`],
//! [`PodCgroup::plan_in`]); a path with `..`, a relative path or the root cgroup is
//! refused.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The slice a systemd-form path with an empty slice means (as runc).
const DEFAULT_SLICE: &str = "system.slice";
/// How long the removal of a cgroup waits for its killed processes to leave it.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

fn refuse(raw: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("linux.cgroupsPath {raw:?} {why}"))
}

/// Checks one path component: a plain cgroup name.
fn check_name(raw: &str, name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(refuse(raw, &format!("has the component {name:?}")));
    }
    if name.contains('/') || name.chars().any(char::is_control) || name.len() > 255 {
        return Err(refuse(raw, &format!("has the invalid name {name:?}")));
    }
    Ok(())
}

/// The cgroup `linux.cgroupsPath` names, relative to a hierarchy's root (no leading
/// `/`). `slice:prefix:name` (three parts, no leading `/`) is systemd's form; anything
/// else must be an absolute cgroupfs path. `..` anywhere, a relative cgroupfs path and
/// the root cgroup itself are refused.
pub fn parse_cgroups_path(raw: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = raw.split(':').collect();
    let path = match parts.as_slice() {
        [slice, prefix, name] if !raw.starts_with('/') => systemd_path(raw, slice, prefix, name)?,
        _ => cgroupfs_path(raw)?,
    };
    if path.as_os_str().is_empty() {
        return Err(refuse(raw, "names the root cgroup"));
    }
    Ok(path)
}

fn cgroupfs_path(raw: &str) -> Result<PathBuf> {
    if !raw.starts_with('/') {
        return Err(refuse(
            raw,
            "is neither an absolute cgroupfs path nor systemd's slice:prefix:name",
        ));
    }
    let mut path = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => {
                let name = name.to_str().unwrap_or_default();
                check_name(raw, name)?;
                path.push(name);
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse(raw, "has the component \"..\""));
            }
        }
    }
    Ok(path)
}

/// systemd's `slice:prefix:name`: the slice expanded into its parents, then the unit
/// (`prefix-name.scope`, or `name` itself when it is a slice), as runc's systemd
/// driver places it.
fn systemd_path(raw: &str, slice: &str, prefix: &str, name: &str) -> Result<PathBuf> {
    check_name(raw, name)?;
    if !prefix.is_empty() {
        check_name(raw, prefix)?;
    }
    let slice = if slice.is_empty() {
        DEFAULT_SLICE
    } else {
        slice
    };
    let mut path = expand_slice(raw, slice)?;
    let unit = if name.ends_with(".slice") {
        name.to_owned()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push(unit);
    Ok(path)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root.
fn expand_slice(raw: &str, slice: &str) -> Result<PathBuf> {
    check_name(raw, slice)?;
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(refuse(
            raw,
            &format!("has the slice {slice:?}, not *.slice"),
        ));
    };
    if stem == "-" {
        return Ok(PathBuf::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(refuse(raw, &format!("has the invalid slice {slice:?}")));
    }
    let mut path = PathBuf::new();
    for (i, _) in stem.match_indices('-') {
        path.push(format!("{}.slice", &stem[..i]));
    }
    path.push(slice);
    Ok(path)
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Which of its cgroups is mounted there (`/` unless a cgroup namespace or a bind
    /// mount shows only a subtree).
    pub root: PathBuf,
    /// cgroup2 (the unified hierarchy) rather than a v1 one.
    pub unified: bool,
}

/// The cgroup hierarchies in a mountinfo text, each once (a hierarchy mounted twice
/// has one device number).
pub fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut seen = Vec::new();
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(device), Some(root), Some(mount_point), Some(fs_type)) = (
            fields.get(2),
            fields.get(3),
            fields.get(4),
            fields.get(dash + 1),
        ) else {
            continue;
        };
        let unified = match *fs_type {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        if seen.contains(device) {
            continue;
        }
        seen.push(*device);
        found.push(Hierarchy {
            mount_point: PathBuf::from(crate::rootfs::unescape_octal(mount_point)),
            root: PathBuf::from(crate::rootfs::unescape_octal(root)),
            unified,
        });
    }
    found
}

/// The pod's cgroup in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    /// The hierarchy's mount point.
    pub mount_point: PathBuf,
    /// The cgroup's directory under it.
    pub dir: PathBuf,
    /// In the unified (cgroup2) hierarchy.
    pub unified: bool,
}

impl CgroupDir {
    /// The directories from the mount point (excluded) down to the cgroup itself.
    fn levels(&self) -> Vec<PathBuf> {
        let mut levels: Vec<PathBuf> = self
            .dir
            .ancestors()
            .take_while(|p| p.starts_with(&self.mount_point) && *p != self.mount_point)
            .map(Path::to_path_buf)
            .collect();
        levels.reverse();
        levels
    }
}

/// The pod's cgroup: its directory in each hierarchy, and the directories the shim
/// makes for it (recorded in the state file, so `shim delete` removes them too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodCgroup {
    /// The cgroup in each hierarchy; empty when the spec names none.
    pub dirs: Vec<CgroupDir>,
    /// The directories that did not exist when planned, parents first.
    pub to_create: Vec<PathBuf>,
}

impl PodCgroup {
    /// The cgroup `cgroups_path` names on this host (`/proc/self/mountinfo`); none
    /// when the spec has no path.
    pub fn plan(cgroups_path: Option<&str>) -> Result<PodCgroup> {
        let Some(raw) = cgroups_path.filter(|p| !p.is_empty()) else {
            return Ok(PodCgroup::default());
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(Error::io("cannot read /proc/self/mountinfo"))?;
        PodCgroup::plan_in(&hierarchies(&mountinfo), raw, |p| p.exists())
    }

    /// The cgroup `raw` names in `hierarchies`, with the directories that `exists`
    /// says are missing.
    pub fn plan_in(
        hierarchies: &[Hierarchy],
        raw: &str,
        exists: impl Fn(&Path) -> bool,
    ) -> Result<PodCgroup> {
        let relative = parse_cgroups_path(raw)?;
        if hierarchies.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "linux.cgroupsPath {raw:?}: no cgroup hierarchy is mounted on this host"
            )));
        }
        let absolute = Path::new("/").join(&relative);
        let mut plan = PodCgroup::default();
        for h in hierarchies {
            let Ok(under_root) = absolute.strip_prefix(&h.root) else {
                return Err(refuse(
                    raw,
                    &format!(
                        "is outside the cgroup {} mounted at {}",
                        h.root.display(),
                        h.mount_point.display()
                    ),
                ));
            };
            let dir = CgroupDir {
                mount_point: h.mount_point.clone(),
                dir: h.mount_point.join(under_root),
                unified: h.unified,
            };
            plan.to_create
                .extend(dir.levels().into_iter().filter(|level| !exists(level)));
            plan.dirs.push(dir);
        }
        Ok(plan)
    }

    /// The cgroup directories the VM's processes join.
    pub fn join_dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.dir.clone()).collect()
    }

    /// Creates the missing directories. In cgroup2 each parent gets the controllers it
    /// has enabled for its children (as runc does; best effort: a parent with
    /// processes of its own cannot); in a v1 cpuset hierarchy a new cgroup gets its
    /// parent's CPUs and memory nodes (an empty cpuset admits no process).
    pub fn create(&self) -> Result<()> {
        for dir in &self.dirs {
            for level in dir.levels() {
                if dir.unified
                    && let Some(parent) = level.parent()
                {
                    enable_controllers(parent);
                }
                match std::fs::create_dir(&level) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(Error::io(format!(
                            "cannot create the pod's cgroup {}",
                            level.display()
                        ))(e));
                    }
                }
                if !dir.unified {
                    inherit_cpuset(&level)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes `+<controller>` to `parent`'s `cgroup.subtree_control` for each controller
/// it has and has not enabled yet. Best effort: logged, never fatal.
fn enable_controllers(parent: &Path) {
    let read = |name: &str| std::fs::read_to_string(parent.join(name)).unwrap_or_default();
    let enabled = read("cgroup.subtree_control");
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    for controller in read("cgroup.controllers").split_whitespace() {
        if enabled.contains(&controller) {
            continue;
        }
        let control = parent.join("cgroup.subtree_control");
        if let Err(e) = std::fs::write(&control, format!("+{controller}")) {
            tracing::debug!(file = %control.display(), controller, error = %e, "controller not enabled");
        }
    }
}

/// Copies the parent's `cpuset.cpus` / `cpuset.mems` into a v1 cgroup whose own are
/// empty (a cgroup without them admits no process).
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Ok(current) = std::fs::read_to_string(&own) else {
            continue;
        };
        if !current.trim().is_empty() {
            continue;
        }
        let value = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
        std::fs::write(&own, value.trim()).map_err(Error::io(format!(
            "cannot copy {file} into the pod's cgroup {}",
            dir.display()
        )))?;
    }
    Ok(())
}

/// Removes the cgroup directories the shim created (`created`, parents first), the
/// deepest first. A cgroup whose killed processes have not left yet is retried for a
/// few seconds; one that still holds processes or other cgroups (another sandbox's,
/// the kubelet's) stays. Only `rmdir`: nothing is ever removed recursively.
pub fn remove_created(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cgroup not removed");
                    break;
                }
            }
        }
    }
}

/// The `cgroup.procs` of each of `dirs`, open for the child to write itself into
/// (close-on-exec: they are gone by the time the program runs).
#[derive(Debug)]
pub struct JoinFds(Vec<OwnedFd>);

impl JoinFds {
    /// Opens `<dir>/cgroup.procs` of each of `dirs`.
    pub fn open(dirs: &[PathBuf]) -> Result<JoinFds> {
        dirs.iter()
            .map(|dir| {
                let procs = dir.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map(OwnedFd::from)
                    .map_err(Error::io(format!("cannot open {}", procs.display())))
            })
            .collect::<Result<_>>()
            .map(JoinFds)
    }

    /// Makes `command`'s child write itself (`0`) into each cgroup between fork and
    /// exec. `self` must live until the command has been spawned.
    pub fn join_before_exec(&self, command: &mut tokio::process::Command) {
        if self.0.is_empty() {
            return;
        }
        let fds: Vec<RawFd> = self.0.iter().map(AsRawFd::as_raw_fd).collect();
        let join = move || {
            for fd in &fds {
                // SAFETY: write(2) of a one-byte static buffer on a descriptor that is
                // open in the child (the parent keeps it open until the spawn returns).
                if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only calls
        // write(2), which is async-signal-safe; it allocates nothing (`last_os_error`
        // only reads errno).
        unsafe {
            command.pre_exec(join);
        }
    }
}

/// The cgroup `pid` is in, per hierarchy, from `/proc/<pid>/cgroup` text:
/// (controllers, path); the unified hierarchy's controllers are empty.
pub fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_paths_parse_in_both_forms() {
        let cases = [
            (
                "/kubepods/burstable/pod1234/abc",
                "kubepods/burstable/pod1234/abc",
            ),
            ("/default/ctr1", "default/ctr1"),
            ("//a/./b/", "a/b"),
            (
                "kubepods-burstable-pod1234.slice:cri-containerd:abc",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-abc.scope",
            ),
            (
                "kubepods.slice:cri-containerd:abc",
                "kubepods.slice/cri-containerd-abc.scope",
            ),
            ("-.slice:cri:abc", "cri-abc.scope"),
            ("machine.slice::vm1", "machine.slice/vm1.scope"),
            (":docker:abc", "system.slice/docker-abc.scope"),
            ("a-b.slice:x:c.slice", "a.slice/a-b.slice/c.slice"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse_cgroups_path(raw).expect(raw),
                PathBuf::from(want),
                "{raw}"
            );
        }
    }

    #[test]
    fn hostile_cgroups_paths_are_refused() {
        let cases = [
            ("/kubepods/../../etc", "\"..\""),
            ("/..", "\"..\""),
            ("kubepods/pod1", "neither an absolute"),
            ("../x", "neither an absolute"),
            ("/", "root cgroup"),
            ("//", "root cgroup"),
            ("-.slice:a:b.slice/../..", "invalid name"),
            ("../../x.slice:cri:abc", "invalid name"),
            ("kubepods.slice:cri:..", "\"..\""),
            ("kubepods.slice:..:abc", "\"..\""),
            ("kubepods.slice:cri:", "\"\""),
            ("kubepods:cri:abc", "not *.slice"),
            ("a--b.slice:cri:abc", "invalid slice"),
            ("-a.slice:cri:abc", "invalid slice"),
            ("/a/b\nc", "invalid name"),
            ("a:b", "neither an absolute"),
        ];
        for (raw, want) in cases {
            let err = parse_cgroups_path(raw).expect_err(raw).to_string();
            assert!(err.contains(want), "{raw}: {err}");
            assert!(err.contains("linux.cgroupsPath"), "{raw}: {err}");
        }
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 20 0:32 / /mnt/memory\\040again rw,relatime - cgroup cgroup rw,memory
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
";
    const UNIFIED: &str = "\
25 20 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn h(mount_point: &str, root: &str, unified: bool) -> Hierarchy {
        Hierarchy {
            mount_point: mount_point.into(),
            root: root.into(),
            unified,
        }
    }

    #[test]
    fn hierarchies_are_found_once_each() {
        assert_eq!(
            hierarchies(HYBRID),
            vec![
                h("/sys/fs/cgroup/cpu", "/", false),
                h("/sys/fs/cgroup/memory", "/", false),
                h("/sys/fs/cgroup/systemd", "/", false),
                h("/sys/fs/cgroup/unified", "/", true),
            ]
        );
        assert_eq!(hierarchies(UNIFIED), vec![h("/sys/fs/cgroup", "/", true)]);
        assert_eq!(hierarchies(""), vec![]);
    }

    #[test]
    fn the_pod_cgroup_is_placed_in_every_hierarchy() {
        let exists = |p: &Path| {
            ["/sys/fs/cgroup/kubepods", "/sys/fs/cgroup/memory/kubepods"]
                .iter()
                .any(|e| p == Path::new(e))
        };
        let plan =
            PodCgroup::plan_in(&hierarchies(UNIFIED), "/kubepods/pod1/abc", exists).expect("plan");
        assert_eq!(
            plan.join_dirs(),
            vec![PathBuf::from("/sys/fs/cgroup/kubepods/pod1/abc")]
        );
        assert_eq!(
            plan.to_create,
            vec![
                PathBuf::from("/sys/fs/cgroup/kubepods/pod1"),
                PathBuf::from("/sys/fs/cgroup/kubepods/pod1/abc"),
            ]
        );
        let plan = PodCgroup::plan_in(&hierarchies(HYBRID), "/kubepods/abc", exists).expect("plan");
        assert_eq!(
            plan.join_dirs(),
            [
                "/sys/fs/cgroup/cpu/kubepods/abc",
                "/sys/fs/cgroup/memory/kubepods/abc",
                "/sys/fs/cgroup/systemd/kubepods/abc",
                "/sys/fs/cgroup/unified/kubepods/abc",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(plan.to_create.len(), 7, "{:?}", plan.to_create);
        assert!(!plan.dirs[1].unified && plan.dirs[3].unified);
    }

    #[test]
    fn a_namespaced_mount_shows_only_its_subtree() {
        let inside = [h("/sys/fs/cgroup", "/kubepods", true)];
        let plan = PodCgroup::plan_in(&inside, "/kubepods/pod1/abc", |_| true).expect("plan");
        assert_eq!(
            plan.join_dirs(),
            vec![PathBuf::from("/sys/fs/cgroup/pod1/abc")]
        );
        let err = PodCgroup::plan_in(&inside, "/other/abc", |_| true).expect_err("outside");
        assert!(
            err.to_string().contains("outside the cgroup /kubepods"),
            "{err}"
        );
        let err = PodCgroup::plan_in(&[], "/a", |_| true).expect_err("no hierarchy");
        assert!(err.to_string().contains("no cgroup hierarchy"), "{err}");
    }

    #[test]
    fn create_and_remove_in_a_fake_tree() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let v2 = tmp.path().join("unified");
        let cpuset = tmp.path().join("cpuset");
        std::fs::create_dir_all(&v2).expect("mkdir");
        std::fs::create_dir_all(cpuset.join("kubepods")).expect("mkdir");
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        std::fs::write(v2.join("cgroup.subtree_control"), "memory\n").expect("write");
        std::fs::write(cpuset.join("kubepods/cpuset.cpus"), "0-3\n").expect("write");
        std::fs::write(cpuset.join("kubepods/cpuset.mems"), "0\n").expect("write");
        let tree = [
            h(v2.to_str().expect("utf-8"), "/", true),
            h(cpuset.to_str().expect("utf-8"), "/", false),
        ];
        let plan = PodCgroup::plan_in(&tree, "/kubepods/abc", |p| p.exists()).expect("plan");
        assert_eq!(
            plan.to_create,
            vec![
                v2.join("kubepods"),
                v2.join("kubepods/abc"),
                cpuset.join("kubepods/abc")
            ]
        );
        // A real cpuset cgroup starts with empty files; here the test plants them.
        std::fs::create_dir(cpuset.join("kubepods/abc")).expect("mkdir");
        std::fs::write(cpuset.join("kubepods/abc/cpuset.cpus"), "\n").expect("write");
        std::fs::write(cpuset.join("kubepods/abc/cpuset.mems"), "").expect("write");
        plan.create().expect("create");
        for dir in plan.join_dirs() {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        // The fake files take what is written, not the kernel's `+name` syntax.
        let control = std::fs::read_to_string(v2.join("cgroup.subtree_control")).expect("read");
        assert_eq!(control, "+pids");
        let cpus = std::fs::read_to_string(cpuset.join("kubepods/abc/cpuset.cpus")).expect("read");
        assert_eq!(cpus, "0-3");
        let mems = std::fs::read_to_string(cpuset.join("kubepods/abc/cpuset.mems")).expect("read");
        assert_eq!(mems, "0");
        // A cgroup that holds something (here a file, as a child cgroup would) stays.
        std::fs::remove_file(cpuset.join("kubepods/abc/cpuset.cpus")).expect("rm");
        std::fs::remove_file(cpuset.join("kubepods/abc/cpuset.mems")).expect("rm");
        std::fs::write(v2.join("kubepods/keep"), "").expect("write");
        remove_created(&plan.to_create);
        assert!(!v2.join("kubepods/abc").exists());
        assert!(
            v2.join("kubepods").exists(),
            "a non-empty cgroup was removed"
        );
        assert!(!cpuset.join("kubepods/abc").exists());
        assert!(cpuset.join("kubepods").exists(), "not ours");
    }

    #[test]
    fn proc_cgroup_lines_parse() {
        let text = "4:memory:/kubepods/abc\n1:name=systemd:/x:y\n0::/kubepods/abc\n";
        assert_eq!(
            parse_proc_cgroup(text),
            vec![
                ("memory".to_owned(), "/kubepods/abc".to_owned()),
                ("name=systemd".to_owned(), "/x:y".to_owned()),
                (String::new(), "/kubepods/abc".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn a_child_joins_before_exec() {
        // A regular file stands in for cgroup.procs: the child writes `0` into it.
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = vec![tmp.path().join("a"), tmp.path().join("b")];
        for dir in &dirs {
            std::fs::create_dir(dir).expect("mkdir");
            std::fs::write(dir.join("cgroup.procs"), "").expect("write");
        }
        let fds = JoinFds::open(&dirs).expect("open");
        let mut command = tokio::process::Command::new("/bin/true");
        fds.join_before_exec(&mut command);
        let status = command.status().await.expect("spawn");
        assert!(status.success());
        drop(fds);
        for dir in &dirs {
            let written = std::fs::read_to_string(dir.join("cgroup.procs")).expect("read");
            assert_eq!(written, "0");
        }
        let err = JoinFds::open(&[tmp.path().join("missing")]).expect_err("missing");
        assert!(err.to_string().contains("cgroup.procs"), "{err}");
    }
}
