//! The NVIDIA driver inside containers, the CDI way.
//!
//! At boot (when the modules were asked for and the image has
//! [`DRIVER_JSON`]) the agent writes a CDI spec ([`SPEC_PATH`], kind
//! `nvidia.com/gpu`, `cdiVersion` 0.6.0) from the driver's file list and the device
//! nodes it made: one device per GPU (by index and by UUID) plus `all`, the control
//! nodes, every library bind-mounted read-only at `/usr/lib/x86_64-linux-gnu/<file>`,
//! the binaries at `/usr/bin/<name>`, and two hooks named after `nvidia-cdi-hook`'s
//! (`create-symlinks` for the sonames, `update-ldcache`) which the agent performs
//! itself. Each capability's mounts are listed in an annotation
//! `capability.gpuvm.dev/<capability>`.
//!
//! Creating a container reads the spec back and [`select`]s what the container gets
//! from its environment and annotations, as nvidia-container-toolkit does:
//! - `NVIDIA_VISIBLE_DEVICES`: unset or `all` = every GPU; `none` = no GPU node but
//!   the control nodes and libraries; `void` or empty = nothing at all; else a comma
//!   list of indices or UUIDs (an unknown one fails the create).
//! - `NVIDIA_DRIVER_CAPABILITIES`: unset or empty = `utility,compute`; `all`; or a list.
//! - Annotations: `gpuvm.dev/no-gpu-containers: a,b` opts the containers named `a`
//!   and `b` (`io.kubernetes.cri.container-name`) out; a CRI sandbox (pause)
//!   container gets nothing.
//!
//! The edits become ordinary mount steps ([`ContainerEdits::add_steps`]), resolved
//! inside the rootfs with `openat2(RESOLVE_IN_ROOT)` like every other mount point: a
//! tenant's symlink in `/usr/lib/x86_64-linux-gnu` cannot send a bind mount, a node
//! or a link onto the guest.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use gpuvm_protocol::agent as pb;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mounts::{Plan, Step};
use crate::nvidia::{DRIVER_LIB_DIR, DriverGpu, Loaded, NVIDIA_MAJOR};
use crate::spec::{MountSpec, join_in_root, mount_spec};

/// The driver's file list in the GPU image (written by `guest/pack.py`).
pub const DRIVER_JSON: &str = "/etc/gpuvm/nvidia/driver.json";
/// Where the agent writes the CDI spec in the guest.
pub const SPEC_PATH: &str = "/var/run/cdi/nvidia.json";
/// The CDI kind.
pub const KIND: &str = "nvidia.com/gpu";
/// Where libraries go in the container (Debian/Ubuntu's multiarch directory).
pub const CONTAINER_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// Where binaries go in the container.
pub const CONTAINER_BIN_DIR: &str = "/usr/bin";
/// Pod annotation: comma-separated container names that get no driver.
pub const NO_GPU_ANNOTATION: &str = "gpuvm.dev/no-gpu-containers";
/// Spec annotation prefix: `capability.gpuvm.dev/compute` lists compute's mounts.
pub const CAPABILITY_ANNOTATION: &str = "capability.gpuvm.dev/";
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The capabilities a container gets when it names none.
pub const DEFAULT_CAPABILITIES: [&str; 2] = ["utility", "compute"];
const HOOK_PATH: &str = "/init";
const MOUNT_OPTIONS: [&str; 4] = ["ro", "nosuid", "nodev", "bind"];

/// One library of `driver.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Library {
    /// Relative to [`DRIVER_LIB_DIR`].
    pub file: String,
    /// Its soname (`libcuda.so.1`).
    pub soname: String,
    /// nvidia-container-toolkit's capability (`compute`, `utility`, ...).
    pub capability: String,
}

/// One binary of `driver.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binary {
    /// Relative to [`DRIVER_LIB_DIR`] (`bin/nvidia-smi`).
    pub file: String,
    /// Its name in `/usr/bin`.
    pub name: String,
    /// Its capability.
    pub capability: String,
}

/// `/etc/gpuvm/nvidia/driver.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverFiles {
    /// Driver version.
    pub version: String,
    /// Libraries.
    pub libraries: Vec<Library>,
    /// Binaries.
    #[serde(default)]
    pub binaries: Vec<Binary>,
    /// GSP firmware directory (the kernel's business, not the containers').
    #[serde(default)]
    pub firmware_dir: Option<String>,
}

/// A CDI spec (the subset the agent writes).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `0.6.0`.
    pub cdi_version: String,
    /// [`KIND`].
    pub kind: String,
    /// Spec annotations (the capability lists).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The GPUs.
    pub devices: Vec<Device>,
    /// What every GPU container gets.
    #[serde(default)]
    pub container_edits: Edits,
}

/// A CDI device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// `0`, `GPU-<uuid>`, `all`.
    pub name: String,
    /// Its edits.
    pub container_edits: Edits,
}

/// CDI container edits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edits {
    /// Device nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNodeEdit>,
    /// Bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountEdit>,
    /// Hooks (performed by the agent itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

/// A CDI device node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNodeEdit {
    /// Path in the container (= in the guest).
    pub path: String,
    /// `c`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

/// A CDI mount.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MountEdit {
    /// Guest path.
    pub host_path: String,
    /// Container path.
    pub container_path: String,
    /// Mount options.
    pub options: Vec<String>,
}

/// A CDI hook.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// `createContainer`.
    pub hook_name: String,
    /// The program ([`HOOK_PATH`], the agent).
    pub path: String,
    /// `gpuvm-agent create-symlinks --link <target>::<link> ...` or `... update-ldcache`.
    pub args: Vec<String>,
}

/// What one container gets, ready for the mount planner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEdits {
    /// Device nodes (path, major, minor).
    pub device_nodes: Vec<(PathBuf, u32, u32)>,
    /// Read-only binds of the driver's files.
    pub mounts: Vec<MountSpec>,
    /// `(target, link)`: relative soname links.
    pub symlinks: Vec<(PathBuf, PathBuf)>,
    /// Run the container's `/sbin/ldconfig` before its init.
    pub update_ldcache: bool,
}

/// A single path component (no `/`, not `.` or `..`, no NUL, not empty).
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// A relative path of plain components.
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

impl DriverFiles {
    /// Parses and checks `driver.json`: names are plain, files stay under
    /// [`DRIVER_LIB_DIR`].
    pub fn parse(text: &str) -> Result<Self> {
        let files: Self = serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("{DRIVER_JSON} is not valid: {e}")))?;
        let bad = |what: &str, value: &str| {
            Error::invalid(format!(
                "{DRIVER_JSON}: the {what} {value:?} is not allowed"
            ))
        };
        for library in &files.libraries {
            let base = Path::new(&library.file).file_name();
            if !is_plain_relative(&library.file) || base.is_none() {
                return Err(bad("library file", &library.file));
            }
            if !is_plain_name(&library.soname) {
                return Err(bad("soname", &library.soname));
            }
        }
        for binary in &files.binaries {
            if !is_plain_relative(&binary.file) {
                return Err(bad("binary file", &binary.file));
            }
            if !is_plain_name(&binary.name) {
                return Err(bad("binary name", &binary.name));
            }
        }
        Ok(files)
    }
}

fn node_edit(path: &Path, major: u32, minor: u32) -> DeviceNodeEdit {
    DeviceNodeEdit {
        path: path.display().to_string(),
        kind: "c".into(),
        major,
        minor,
    }
}

fn hook(args: &[&str]) -> Hook {
    Hook {
        hook_name: "createContainer".into(),
        path: HOOK_PATH.into(),
        args: std::iter::once("gpuvm-agent")
            .chain(args.iter().copied())
            .map(str::to_string)
            .collect(),
    }
}

/// The spec for `files` and the nodes the agent made (`gpus` in index order).
pub fn build_spec(
    files: &DriverFiles,
    nodes: &[crate::nvidia::DeviceNode],
    gpus: &[DriverGpu],
) -> Spec {
    let mut spec = Spec {
        cdi_version: "0.6.0".into(),
        kind: KIND.into(),
        ..Spec::default()
    };
    let gpu_node = |minor: u32| {
        nodes
            .iter()
            .find(|n| n.major == NVIDIA_MAJOR && n.minor == minor && minor < 254)
    };
    let mut all = Edits::default();
    for (index, gpu) in gpus.iter().enumerate() {
        let Some(node) = gpu_node(gpu.minor) else {
            continue;
        };
        let edits = Edits {
            device_nodes: vec![node_edit(&node.path, node.major, node.minor)],
            ..Edits::default()
        };
        all.device_nodes.extend(edits.device_nodes.iter().cloned());
        let names = std::iter::once(index.to_string()).chain(gpu.uuid.clone());
        for name in names {
            spec.devices.push(Device {
                name,
                container_edits: edits.clone(),
            });
        }
    }
    spec.devices.push(Device {
        name: "all".into(),
        container_edits: all,
    });
    let common = &mut spec.container_edits;
    common.device_nodes = nodes
        .iter()
        .filter(|n| gpu_node(n.minor).is_none_or(|g| g.path != n.path))
        .map(|n| node_edit(&n.path, n.major, n.minor))
        .collect();
    let mut capabilities: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut links = Vec::new();
    let mut mount = |file: &str, container_path: String, capability: &str| {
        capabilities
            .entry(capability.to_string())
            .or_default()
            .push(container_path.clone());
        common.mounts.push(MountEdit {
            host_path: Path::new(DRIVER_LIB_DIR).join(file).display().to_string(),
            container_path,
            options: MOUNT_OPTIONS.iter().map(|s| s.to_string()).collect(),
        });
    };
    for library in &files.libraries {
        let base = Path::new(&library.file)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        mount(
            &library.file,
            format!("{CONTAINER_LIB_DIR}/{base}"),
            &library.capability,
        );
        if library.soname != base {
            links.push(format!("{base}::{CONTAINER_LIB_DIR}/{}", library.soname));
        }
    }
    for binary in &files.binaries {
        mount(
            &binary.file,
            format!("{CONTAINER_BIN_DIR}/{}", binary.name),
            &binary.capability,
        );
    }
    let mut args = vec!["create-symlinks"];
    for link in &links {
        args.extend(["--link", link.as_str()]);
    }
    if !links.is_empty() {
        common.hooks.push(hook(&args));
    }
    if !files.libraries.is_empty() {
        common.hooks.push(hook(&["update-ldcache"]));
    }
    spec.annotations = capabilities
        .into_iter()
        .map(|(cap, paths)| (format!("{CAPABILITY_ANNOTATION}{cap}"), paths.join(",")))
        .collect();
    spec
}

/// At boot: builds the spec from [`DRIVER_JSON`] and writes it to [`SPEC_PATH`];
/// `None` (logged) when the image has no driver files or writing fails.
pub fn write_boot_spec(loaded: &Loaded) -> Option<Spec> {
    let text = std::fs::read_to_string(DRIVER_JSON)
        .map_err(|e| tracing::info!("No CDI spec: reading {DRIVER_JSON} failed: {e}"))
        .ok()?;
    let files = DriverFiles::parse(&text)
        .map_err(|e| tracing::error!("No CDI spec: {e}"))
        .ok()?;
    let spec = build_spec(&files, &loaded.device_nodes, &loaded.gpus);
    let written = serde_json::to_vec_pretty(&spec)
        .map_err(std::io::Error::other)
        .and_then(|json| {
            if let Some(dir) = Path::new(SPEC_PATH).parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(SPEC_PATH, json)
        });
    if let Err(e) = written {
        tracing::error!("Writing the CDI spec {SPEC_PATH} failed: {e}");
        return None;
    }
    Some(spec)
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn opted_out(annotations: &HashMap<String, String>) -> bool {
    if annotations.get(CONTAINER_TYPE).map(String::as_str) == Some("sandbox") {
        return true;
    }
    let Some(name) = annotations.get(CONTAINER_NAME) else {
        return false;
    };
    annotations
        .get(NO_GPU_ANNOTATION)
        .is_some_and(|list| list.split(',').any(|n| n.trim() == name))
}

/// The GPU devices `NVIDIA_VISIBLE_DEVICES` asks for; `None` opts out entirely.
fn visible_devices<'a>(spec: &'a Spec, value: Option<&str>) -> Result<Option<Vec<&'a Device>>> {
    let by_name = |name: &str| spec.devices.iter().find(|d| d.name == name);
    let value = value.map(str::trim);
    Ok(Some(match value {
        Some("" | "void") => return Ok(None),
        Some("none") => Vec::new(),
        None | Some("all") => by_name("all").into_iter().collect(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                by_name(name).filter(|d| d.name != "all").ok_or_else(|| {
                    let known: Vec<&str> = spec.devices.iter().map(|d| d.name.as_str()).collect();
                    Error::invalid(format!(
                        "NVIDIA_VISIBLE_DEVICES names the GPU {name:?}, which the guest does not \
                         have (it has: {})",
                        known.join(", ")
                    ))
                })
            })
            .collect::<Result<_>>()?,
    }))
}

/// The container paths of the capabilities `NVIDIA_DRIVER_CAPABILITIES` asks for.
fn capability_paths(spec: &Spec, value: Option<&str>) -> BTreeSet<String> {
    let wanted: Vec<&str> = match value.map(str::trim) {
        None | Some("") => DEFAULT_CAPABILITIES.to_vec(),
        Some(list) => list.split(',').map(str::trim).collect(),
    };
    spec.annotations
        .iter()
        .filter_map(|(key, paths)| {
            let cap = key.strip_prefix(CAPABILITY_ANNOTATION)?;
            (wanted.contains(&"all") || wanted.contains(&cap)).then_some(paths)
        })
        .flat_map(|paths| paths.split(',').map(str::to_string))
        .collect()
}

/// Whether a mount belongs to no capability (then every GPU container gets it).
fn has_capability(spec: &Spec, container_path: &str) -> bool {
    spec.annotations
        .iter()
        .filter(|(key, _)| key.starts_with(CAPABILITY_ANNOTATION))
        .any(|(_, paths)| paths.split(',').any(|p| p == container_path))
}

/// What a container with environment `env` and `annotations` gets from `spec`;
/// `None` when it opted out.
pub fn select(
    spec: &Spec,
    env: &[(String, String)],
    annotations: &HashMap<String, String>,
) -> Result<Option<ContainerEdits>> {
    if opted_out(annotations) {
        return Ok(None);
    }
    let Some(devices) = visible_devices(spec, env_value(env, "NVIDIA_VISIBLE_DEVICES"))? else {
        return Ok(None);
    };
    let capabilities = capability_paths(spec, env_value(env, "NVIDIA_DRIVER_CAPABILITIES"));
    let mut edits = ContainerEdits::default();
    let nodes = spec
        .container_edits
        .device_nodes
        .iter()
        .chain(devices.iter().flat_map(|d| &d.container_edits.device_nodes));
    for node in nodes {
        let entry = (PathBuf::from(&node.path), node.major, node.minor);
        if !edits.device_nodes.contains(&entry) {
            edits.device_nodes.push(entry);
        }
    }
    let chosen: Vec<&MountEdit> = spec
        .container_edits
        .mounts
        .iter()
        .filter(|m| {
            capabilities.contains(&m.container_path) || !has_capability(spec, &m.container_path)
        })
        .collect();
    for mount in &chosen {
        edits.mounts.push(mount_spec(&pb::Mount {
            destination: mount.container_path.clone(),
            type_: "bind".into(),
            source: mount.host_path.clone(),
            options: mount.options.clone(),
            ..Default::default()
        })?);
    }
    let mounted = |path: &Path| chosen.iter().any(|m| Path::new(&m.container_path) == path);
    for hook in &spec.container_edits.hooks {
        match hook.args.get(1).map(String::as_str) {
            Some("create-symlinks") => {
                for (target, link) in hook.args[2..]
                    .chunks(2)
                    .filter(|pair| pair[0] == "--link" && pair.len() == 2)
                    .filter_map(|pair| pair[1].split_once("::"))
                {
                    let (target, link) = (PathBuf::from(target), PathBuf::from(link));
                    let dir = link.parent().unwrap_or(Path::new("/"));
                    if is_plain_relative(&target.to_string_lossy()) && mounted(&dir.join(&target)) {
                        edits.symlinks.push((target, link));
                    }
                }
            }
            Some("update-ldcache") => {
                edits.update_ldcache = chosen
                    .iter()
                    .any(|m| m.container_path.starts_with(CONTAINER_LIB_DIR));
            }
            _ => tracing::warn!(?hook.args, "Skipping an unknown CDI hook"),
        }
    }
    Ok(Some(edits))
}

/// Whether the container's mounts give it a tmpfs `/dev` (containerd's default).
fn dev_kind(mounts: &[MountSpec]) -> Option<&MountSpec> {
    mounts
        .iter()
        .rev()
        .find(|m| m.destination == Path::new("/dev"))
}

impl ContainerEdits {
    /// Appends the device nodes and soname links to a container's planned steps (the
    /// binds are planned with its mounts). Nodes go into a tmpfs `/dev` only: with the
    /// agent's default recursive bind of the guest's `/dev` every node is visible
    /// already (no per-GPU choice), and without a `/dev` mount none is made.
    pub fn add_steps(&self, rootfs: &Path, mounts: &[MountSpec], plan: &mut Plan) {
        match dev_kind(mounts) {
            Some(dev) if dev.fstype.as_deref() == Some("tmpfs") => {
                for (path, major, minor) in &self.device_nodes {
                    plan.steps.push(Step::CharDevice {
                        path: join_in_root(rootfs, path),
                        major: u64::from(*major),
                        minor: u64::from(*minor),
                    });
                }
            }
            Some(_) if !self.device_nodes.is_empty() => plan.warnings.push(
                "/dev is a bind mount: the container sees every NVIDIA device node of the guest"
                    .into(),
            ),
            None if !self.device_nodes.is_empty() => plan
                .warnings
                .push("The container has no /dev mount: no NVIDIA device node is created".into()),
            _ => {}
        }
        for (target, link) in &self.symlinks {
            plan.steps.push(Step::Symlink {
                target: target.clone(),
                link: join_in_root(rootfs, link),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvidia::DeviceNode;

    const DRIVER: &str = r#"{"version": "550.163.01",
     "libraries": [{"file": "libcuda.so.550.163.01", "soname": "libcuda.so.1", "capability": "compute"},
                   {"file": "libnvidia-ptxjitcompiler.so.550.163.01", "soname": "libnvidia-ptxjitcompiler.so.1", "capability": "compute"},
                   {"file": "libnvidia-ml.so.550.163.01", "soname": "libnvidia-ml.so.1", "capability": "utility"},
                   {"file": "libnvidia-encode.so.550.163.01", "soname": "libnvidia-encode.so.1", "capability": "video"}],
     "binaries": [{"file": "bin/nvidia-smi", "name": "nvidia-smi", "capability": "utility"}],
     "firmware_dir": "/lib/firmware/nvidia/550.163.01"}"#;

    fn node(path: &str, major: u32, minor: u32) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            major,
            minor,
        }
    }

    /// Two GPUs (minors 0 and 1), uvm, modeset.
    fn two_gpu_spec() -> Spec {
        let gpus: Vec<DriverGpu> = [("0000:01:00.0", 0), ("0000:02:00.0", 1)]
            .iter()
            .map(|(bus, minor)| DriverGpu {
                bus: bus.to_string(),
                minor: *minor,
                uuid: Some(format!("GPU-0000000{minor}-57f2-3d6a-9e0b-2f1c7d8e6a53")),
            })
            .collect();
        let nodes = [
            node("/dev/nvidiactl", 195, 255),
            node("/dev/nvidia0", 195, 0),
            node("/dev/nvidia1", 195, 1),
            node("/dev/nvidia-modeset", 195, 254),
            node("/dev/nvidia-uvm", 234, 0),
            node("/dev/nvidia-uvm-tools", 234, 1),
        ];
        build_spec(&DriverFiles::parse(DRIVER).unwrap(), &nodes, &gpus)
    }

    /// `KEY=VALUE` pairs as an environment or annotations.
    fn pairs<T: FromIterator<(String, String)>>(pairs: &[(&str, &str)]) -> T {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn env(list: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs(list)
    }

    fn annotations(list: &[(&str, &str)]) -> HashMap<String, String> {
        pairs(list)
    }

    fn selected(env_pairs: &[(&str, &str)]) -> Option<ContainerEdits> {
        select(&two_gpu_spec(), &env(env_pairs), &HashMap::new()).unwrap()
    }

    fn node_paths(edits: &ContainerEdits) -> Vec<String> {
        edits
            .device_nodes
            .iter()
            .map(|(p, _, _)| p.display().to_string())
            .collect()
    }

    fn mount_targets(edits: &ContainerEdits) -> Vec<String> {
        edits
            .mounts
            .iter()
            .map(|m| m.destination.display().to_string())
            .collect()
    }

    #[test]
    fn the_spec_lists_gpus_by_index_and_uuid_and_round_trips() {
        let spec = two_gpu_spec();
        let names: Vec<&str> = spec.devices.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "0",
                "GPU-00000000-57f2-3d6a-9e0b-2f1c7d8e6a53",
                "1",
                "GPU-00000001-57f2-3d6a-9e0b-2f1c7d8e6a53",
                "all"
            ]
        );
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""cdiVersion":"0.6.0""#), "{json}");
        assert!(json.contains(r#""hostPath":"/usr/lib/gpuvm/nvidia/libcuda.so.550.163.01""#));
        assert!(json.contains(r#""type":"c""#));
        assert_eq!(serde_json::from_str::<Spec>(&json).unwrap(), spec);
        assert_eq!(
            spec.annotations
                .get("capability.gpuvm.dev/utility")
                .map(String::as_str),
            Some("/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.163.01,/usr/bin/nvidia-smi")
        );
    }

    #[test]
    fn by_default_all_gpus_and_utility_compute() {
        let edits = selected(&[]).unwrap();
        assert_eq!(
            node_paths(&edits),
            [
                "/dev/nvidiactl",
                "/dev/nvidia-modeset",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/nvidia1"
            ]
        );
        assert_eq!(
            mount_targets(&edits),
            [
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.163.01",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.550.163.01",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.163.01",
                "/usr/bin/nvidia-smi",
            ]
        );
        assert!(edits.mounts.iter().all(|m| m.flags.contains(
            nix::mount::MsFlags::MS_BIND
                | nix::mount::MsFlags::MS_RDONLY
                | nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
        )));
        assert_eq!(
            edits.symlinks[0],
            (
                PathBuf::from("libcuda.so.550.163.01"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.1")
            )
        );
        // The video library is not mounted, so its link is not made.
        assert_eq!(edits.symlinks.len(), 3);
        assert!(edits.update_ldcache);
        assert_eq!(selected(&[("NVIDIA_VISIBLE_DEVICES", "all")]), Some(edits));
    }

    #[test]
    fn visible_devices_by_index_uuid_none_void_and_empty() {
        let one = selected(&[("NVIDIA_VISIBLE_DEVICES", "1")]).unwrap();
        assert!(node_paths(&one).contains(&"/dev/nvidia1".to_string()));
        assert!(!node_paths(&one).contains(&"/dev/nvidia0".to_string()));
        let uuid = selected(&[(
            "NVIDIA_VISIBLE_DEVICES",
            "GPU-00000000-57f2-3d6a-9e0b-2f1c7d8e6a53, 1",
        )])
        .unwrap();
        assert_eq!(uuid.device_nodes.len(), 6);
        // none: the driver without a GPU (nvidia-container-toolkit's meaning).
        let none = selected(&[("NVIDIA_VISIBLE_DEVICES", "none")]).unwrap();
        assert_eq!(node_paths(&none).len(), 4);
        assert!(!none.mounts.is_empty());
        for opt_out in ["void", "", " "] {
            assert_eq!(selected(&[("NVIDIA_VISIBLE_DEVICES", opt_out)]), None);
        }
        // The last value of a repeated variable counts.
        assert_eq!(
            selected(&[
                ("NVIDIA_VISIBLE_DEVICES", "all"),
                ("NVIDIA_VISIBLE_DEVICES", "void")
            ]),
            None
        );
        let err = select(
            &two_gpu_spec(),
            &env(&[("NVIDIA_VISIBLE_DEVICES", "0,7")]),
            &HashMap::new(),
        )
        .unwrap_err();
        assert_eq!(err.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.to_string().contains(r#"the GPU "7""#), "{err}");
    }

    #[test]
    fn driver_capabilities_choose_the_files() {
        let utility = selected(&[("NVIDIA_DRIVER_CAPABILITIES", "utility")]).unwrap();
        assert_eq!(
            mount_targets(&utility),
            [
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.163.01",
                "/usr/bin/nvidia-smi"
            ]
        );
        let all = selected(&[("NVIDIA_DRIVER_CAPABILITIES", "all")]).unwrap();
        assert_eq!(all.mounts.len(), 5);
        assert_eq!(all.symlinks.len(), 4);
        let video = selected(&[("NVIDIA_DRIVER_CAPABILITIES", "video")]).unwrap();
        assert_eq!(video.mounts.len(), 1);
        assert!(video.update_ldcache);
        let graphics = selected(&[("NVIDIA_DRIVER_CAPABILITIES", "graphics")]).unwrap();
        assert!(graphics.mounts.is_empty() && !graphics.update_ldcache);
        // Empty means the default.
        assert_eq!(
            selected(&[("NVIDIA_DRIVER_CAPABILITIES", "")]),
            selected(&[])
        );
    }

    #[test]
    fn annotations_opt_containers_out() {
        let spec = two_gpu_spec();
        let opt = annotations(&[
            (NO_GPU_ANNOTATION, "log-shipper, sidecar"),
            (CONTAINER_NAME, "sidecar"),
        ]);
        assert_eq!(select(&spec, &[], &opt).unwrap(), None);
        let other = annotations(&[
            (NO_GPU_ANNOTATION, "log-shipper,sidecar"),
            (CONTAINER_NAME, "trainer"),
        ]);
        assert!(select(&spec, &[], &other).unwrap().is_some());
        let pause = annotations(&[(CONTAINER_TYPE, "sandbox")]);
        assert_eq!(select(&spec, &[], &pause).unwrap(), None);
    }

    #[test]
    fn a_spec_without_gpus_still_gives_the_libraries() {
        // nvidia.ko failed (no GPU): no node, but the libraries (the CI case).
        let spec = build_spec(&DriverFiles::parse(DRIVER).unwrap(), &[], &[]);
        let edits = select(&spec, &[], &HashMap::new()).unwrap().unwrap();
        assert!(edits.device_nodes.is_empty());
        assert_eq!(edits.mounts.len(), 4);
        assert!(edits.update_ldcache);
    }

    #[test]
    fn driver_json_with_paths_that_leave_the_driver_dir_is_refused() {
        for (field, value) in [
            ("file", "../../etc/shadow"),
            ("file", "/etc/shadow"),
            ("soname", "../libcuda.so.1"),
            ("soname", "x/libcuda.so.1"),
            ("soname", ""),
        ] {
            let mut library = serde_json::json!({"file": "libcuda.so.1.0", "soname": "libcuda.so.1", "capability": "compute"});
            library[field] = value.into();
            let text = serde_json::json!({"version": "1", "libraries": [library]}).to_string();
            let err = DriverFiles::parse(&text).unwrap_err();
            assert!(err.to_string().contains("is not allowed"), "{value}: {err}");
        }
        let binary = r#"{"version":"1","libraries":[],"binaries":[{"file":"bin/x","name":"..","capability":"utility"}]}"#;
        assert!(DriverFiles::parse(binary).is_err());
        assert!(DriverFiles::parse("{}").is_err());
    }

    fn mount_at(destination: &str, type_: &str) -> MountSpec {
        mount_spec(&pb::Mount {
            destination: destination.into(),
            type_: type_.into(),
            source: if type_ == "bind" {
                "/dev".into()
            } else {
                "tmpfs".into()
            },
            options: if type_ == "bind" {
                vec!["rbind".into()]
            } else {
                Vec::new()
            },
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn nodes_go_into_a_tmpfs_dev_and_links_inside_the_rootfs() {
        let edits = selected(&[("NVIDIA_VISIBLE_DEVICES", "0")]).unwrap();
        let mut plan = Plan::default();
        let mounts = [mount_at("/proc", "proc"), mount_at("/dev", "tmpfs")];
        edits.add_steps(Path::new("/r"), &mounts, &mut plan);
        assert!(plan.warnings.is_empty());
        assert!(plan.steps.contains(&Step::CharDevice {
            path: "/r/dev/nvidia0".into(),
            major: 195,
            minor: 0
        }));
        assert!(plan.steps.contains(&Step::Symlink {
            target: "libnvidia-ml.so.550.163.01".into(),
            link: "/r/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1".into(),
        }));
        // A bind of the guest's /dev: no mknod through it, a warning instead.
        let mut plan = Plan::default();
        edits.add_steps(Path::new("/r"), &[mount_at("/dev", "bind")], &mut plan);
        assert!(
            !plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::CharDevice { .. }))
        );
        assert_eq!(plan.warnings.len(), 1);
        let mut plan = Plan::default();
        edits.add_steps(Path::new("/r"), &[], &mut plan);
        assert!(
            plan.warnings[0].contains("no /dev mount"),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn a_tampered_spec_cannot_link_outside_the_library_dir() {
        let mut spec = two_gpu_spec();
        spec.container_edits.hooks[0].args.extend([
            "--link".into(),
            "../../../etc/shadow::/usr/lib/x86_64-linux-gnu/evil".into(),
        ]);
        let edits = select(&spec, &[], &HashMap::new()).unwrap().unwrap();
        assert!(edits.symlinks.iter().all(|(t, _)| !t.starts_with("..")));
    }
}
