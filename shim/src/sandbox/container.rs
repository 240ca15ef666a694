//! Containers in the sandbox's guest: the OCI spec translated to the agent's plain
//! types (pure), the rootfs under the virtio-fs share, and the agent calls around a
//! container's processes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim::protos::types::mount::Mount as ContainerdMount;

use super::Sandbox;
use crate::agent::{
    Capabilities, ContainerSpec, Namespace, ProcessId, ProcessSpec, Resources, Rlimit, Seccomp,
    SeccompArg, SeccompSyscall,
};
use crate::error::{Error, Result};
use crate::persist::StartTimings;
use crate::stdio::{StdioCopy, StdioPaths};

/// Converts the OCI process to the agent's plain type.
pub fn process_spec(process: &oci_spec::runtime::Process) -> ProcessSpec {
    let user = process.user();
    ProcessSpec {
        args: process.args().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        terminal: process.terminal().unwrap_or(false),
        console_size: process
            .console_size()
            .as_ref()
            .map(|b| (b.height() as u32, b.width() as u32)),
        // No `process.capabilities` means no capabilities (as runc), not all of them.
        capabilities: process
            .capabilities()
            .as_ref()
            .map(capabilities)
            .unwrap_or_default(),
        no_new_privileges: process.no_new_privileges().unwrap_or(false),
        umask: user.umask(),
        rlimits: process
            .rlimits()
            .iter()
            .flatten()
            .map(|r| Rlimit {
                resource: oci_name(&r.typ()),
                soft: r.soft(),
                hard: r.hard(),
            })
            .collect(),
    }
}

/// The OCI `linux.resources` the guest applies to the container's cgroup: memory,
/// CPU and pids. Device rules, cpusets, hugepages, block I/O and the network are the
/// VM's (its devices, vCPUs and memory), not the container's.
pub fn resources(spec: &oci_spec::runtime::Spec) -> Option<Resources> {
    let r = spec.linux().as_ref()?.resources().as_ref()?;
    let memory = r.memory().as_ref();
    let cpu = r.cpu().as_ref();
    let out = Resources {
        memory_limit: memory.and_then(|m| m.limit()),
        memory_reservation: memory.and_then(|m| m.reservation()),
        memory_swap: memory.and_then(|m| m.swap()),
        cpu_shares: cpu.and_then(|c| c.shares()),
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        pids_limit: r.pids().as_ref().map(|p| p.limit()),
    };
    (out != Resources::default()).then_some(out)
}

/// The name OCI gives a spec enum (`SCMP_ACT_ERRNO`, `CAP_SYS_ADMIN`…): its serde
/// form, the one the spec was read from.
fn oci_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

fn capability_set(set: Option<&oci_spec::runtime::Capabilities>) -> Vec<String> {
    let mut names: Vec<String> = set.into_iter().flatten().map(oci_name).collect();
    // A HashSet in the spec: sorted, so the same spec gives the same request.
    names.sort();
    names
}

fn capabilities(caps: &oci_spec::runtime::LinuxCapabilities) -> Capabilities {
    Capabilities {
        bounding: capability_set(caps.bounding().as_ref()),
        effective: capability_set(caps.effective().as_ref()),
        permitted: capability_set(caps.permitted().as_ref()),
        inheritable: capability_set(caps.inheritable().as_ref()),
        ambient: capability_set(caps.ambient().as_ref()),
    }
}

/// The OCI `linux.seccomp` profile, names as OCI spells them.
pub fn seccomp(spec: &oci_spec::runtime::Spec) -> Option<Seccomp> {
    let profile = spec.linux().as_ref()?.seccomp().as_ref()?;
    Some(Seccomp {
        default_action: oci_name(&profile.default_action()),
        default_errno_ret: profile.default_errno_ret(),
        architectures: profile
            .architectures()
            .iter()
            .flatten()
            .map(oci_name)
            .collect(),
        flags: profile.flags().iter().flatten().map(oci_name).collect(),
        syscalls: profile
            .syscalls()
            .iter()
            .flatten()
            .map(|rule| SeccompSyscall {
                names: rule.names().clone(),
                action: oci_name(&rule.action()),
                errno_ret: rule.errno_ret(),
                args: rule
                    .args()
                    .iter()
                    .flatten()
                    .map(|arg| SeccompArg {
                        // Out of range is out of range for the agent too: it refuses it.
                        index: u32::try_from(arg.index()).unwrap_or(u32::MAX),
                        value: arg.value(),
                        value_two: arg.value_two().unwrap_or(0),
                        op: oci_name(&arg.op()),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// The pid/ipc/uts namespaces the container gets for itself. An entry with a path
/// joins an existing namespace, under CRI the pause process's ("shared with the
/// pod"), which in the guest is the guest's own: dropped, as are network, cgroup,
/// user, mount and time (the VM is the pod's network and mount boundary; the agent
/// refuses the rest).
pub fn namespaces(spec: &oci_spec::runtime::Spec) -> Vec<Namespace> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .filter(|ns| ns.path().as_ref().is_none_or(|p| p.as_os_str().is_empty()))
        .filter_map(|ns| {
            let ns_type = match ns.typ() {
                T::Pid => "pid",
                T::Ipc => "ipc",
                T::Uts => "uts",
                _ => return None,
            };
            Some(Namespace {
                ns_type: ns_type.to_owned(),
                path: String::new(),
            })
        })
        .collect()
}

/// One app container to create: what containerd's Create carries.
#[derive(Debug)]
pub struct ContainerRequest<'a> {
    /// Container id.
    pub id: &'a str,
    /// Its bundle.
    pub bundle: &'a Path,
    /// Its OCI spec.
    pub spec: &'a oci_spec::runtime::Spec,
    /// containerd's rootfs mounts.
    pub rootfs: &'a [ContainerdMount],
    /// Whether containerd asked for a terminal.
    pub terminal: bool,
}

/// A container's footprint on the shim's side of the share: its directory
/// (`mounts/<id>`) and the host mounts made in it (its volumes, then its rootfs: the
/// order to unmount them in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerShare {
    /// `mounts/<id>` in the share.
    pub dir: PathBuf,
    /// The mounts in it.
    pub mounts: Vec<PathBuf>,
}

impl ContainerShare {
    /// Unmounts everything in the container's directory and removes it.
    pub fn remove(&self) {
        super::volumes::remove_container_share(&self.dir);
    }
}

impl Sandbox {
    /// Mounts the container's rootfs and its volumes under the share and creates the
    /// container in the guest (not started). Returns its footprint in the share;
    /// nothing is left on failure.
    pub async fn create_container(&self, req: &ContainerRequest<'_>) -> Result<ContainerShare> {
        let process = req
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the OCI spec has no process".into()))?;
        let plan = super::volumes::plan_mounts(req.spec, &self.volumes_guest(req.id))?;
        let dir = self.container_host(req.id);
        let mut share = ContainerShare {
            dir: dir.clone(),
            mounts: Vec::new(),
        };
        let mut process = process_spec(process);
        process.terminal = req.terminal || process.terminal;
        let container_spec = ContainerSpec {
            container_id: req.id.to_owned(),
            rootfs: self.rootfs_guest(req.id),
            process,
            mounts: plan.guest,
            readonly_rootfs: req
                .spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
            seccomp: seccomp(req.spec),
            namespaces: namespaces(req.spec),
            resources: resources(req.spec),
            annotations: req.spec.annotations().clone().unwrap_or_default(),
        };
        let creating = Instant::now();
        let created = match self.mount_container(req, &plan.binds, &dir) {
            Ok(mounts) => {
                share.mounts = mounts;
                self.agent.create_container(&container_spec).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = created {
            share.remove();
            return Err(e);
        }
        self.count_container_time(creating, false);
        Ok(share)
    }

    /// Mounts the container's volumes and rootfs into its directory `dir` of the
    /// share; returns the mounts, volumes first.
    fn mount_container(
        &self,
        req: &ContainerRequest<'_>,
        binds: &[super::volumes::HostBind],
        dir: &Path,
    ) -> Result<Vec<PathBuf>> {
        let root_path = req
            .spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = dir.join("rootfs");
        crate::rootfs::mount(req.rootfs, req.bundle, &root_path, &rootfs)?;
        let forbidden = [self.vm.share.root.as_path(), Path::new(super::RUN_DIR)];
        let mut mounts = super::volumes::share_volumes(binds, &dir.join("volumes"), &forbidden)?;
        mounts.push(rootfs);
        Ok(mounts)
    }

    /// Starts a created process in the guest and its stdio copy. Returns the copy and,
    /// when this was the first app container's start, the sandbox's start timings.
    pub async fn start_process(
        &self,
        id: &ProcessId,
        stdio: &StdioPaths,
    ) -> Result<(StdioCopy, Option<StartTimings>)> {
        let starting = Instant::now();
        self.agent.start_process(id).await.inspect_err(|e| {
            tracing::warn!(task = %id.container_id, exec = %id.exec_id, error = %e, "guest could not start the process");
        })?;
        let first_start = if id.exec_id.is_empty() {
            self.count_container_time(starting, true)
        } else {
            None
        };
        if let Some(t) = first_start {
            tracing::info!(
                sandbox = %self.id(),
                shim_ms = t.shim_ms,
                vmm_ms = t.vmm_ms,
                boot_ms = t.boot_ms,
                agent_ms = t.agent_ms,
                container_ms = t.container_ms,
                "sandbox start timings"
            );
        }
        let copy = StdioCopy::start(self.agent.clone(), id.clone(), stdio);
        Ok((copy, first_start))
    }

    /// Forgets an exited process in the guest. The VM may be gone already, and the
    /// process with it, so a failure is only logged.
    pub async fn delete_process(&self, id: &ProcessId) {
        match self.agent.delete_process(id).await {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => tracing::debug!(task = %id.container_id, error = %e, "agent delete failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_process_translation() {
        let process: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin"],
            "cwd": "/work",
            "user": {"uid": 1000, "gid": 100, "additionalGids": [10]},
            "terminal": true,
            "consoleSize": {"height": 24, "width": 80}
        }))
        .expect("process");
        let spec = process_spec(&process);
        assert_eq!(spec.args, vec!["sh", "-c", "echo hi"]);
        assert_eq!((spec.uid, spec.gid), (1000, 100));
        assert_eq!(spec.additional_gids, vec![10]);
        assert_eq!(spec.cwd, "/work");
        assert!(spec.terminal);
        assert_eq!(spec.console_size, Some((24, 80)));
        // No capabilities, no no-new-privileges, no umask in the spec.
        assert_eq!(spec.capabilities, Capabilities::default());
        assert!(!spec.no_new_privileges);
        assert_eq!(spec.umask, None);
    }

    #[test]
    fn process_security_translation() {
        let process: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0, "umask": 63},
            "noNewPrivileges": true,
            "capabilities": {
                "bounding": ["CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_KILL"],
                "effective": ["CAP_KILL", "CAP_CHOWN"],
                "permitted": ["CAP_KILL", "CAP_CHOWN"],
                "ambient": []
            }
        }))
        .expect("process");
        let spec = process_spec(&process);
        assert_eq!(spec.umask, Some(0o077));
        assert!(spec.no_new_privileges);
        assert_eq!(
            spec.capabilities,
            Capabilities {
                bounding: vec![
                    "CAP_CHOWN".into(),
                    "CAP_KILL".into(),
                    "CAP_SYS_ADMIN".into()
                ],
                effective: vec!["CAP_CHOWN".into(), "CAP_KILL".into()],
                permitted: vec!["CAP_CHOWN".into(), "CAP_KILL".into()],
                inheritable: vec![],
                ambient: vec![],
            }
        );
    }

    fn linux_spec(linux: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "linux": linux}))
            .expect("spec")
    }

    #[test]
    fn seccomp_translation_keeps_oci_names() {
        assert_eq!(seccomp(&linux_spec(serde_json::json!({}))), None);
        let spec = linux_spec(serde_json::json!({"seccomp": {
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                          {"index": 0, "value": 4294967295u64, "valueTwo": 131080, "op": "SCMP_CMP_MASKED_EQ"}]},
                {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS"}
            ]
        }}));
        let want = Seccomp {
            default_action: "SCMP_ACT_ERRNO".into(),
            default_errno_ret: Some(38),
            architectures: vec![
                "SCMP_ARCH_X86_64".into(),
                "SCMP_ARCH_X86".into(),
                "SCMP_ARCH_X32".into(),
            ],
            flags: vec![
                "SECCOMP_FILTER_FLAG_LOG".into(),
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW".into(),
            ],
            syscalls: vec![
                SeccompSyscall {
                    names: vec!["read".into(), "write".into()],
                    action: "SCMP_ACT_ALLOW".into(),
                    errno_ret: None,
                    args: vec![],
                },
                SeccompSyscall {
                    names: vec!["mkdir".into()],
                    action: "SCMP_ACT_ERRNO".into(),
                    errno_ret: Some(1),
                    args: vec![],
                },
                SeccompSyscall {
                    names: vec!["personality".into()],
                    action: "SCMP_ACT_ALLOW".into(),
                    errno_ret: None,
                    args: vec![
                        SeccompArg {
                            index: 0,
                            value: 8,
                            value_two: 0,
                            op: "SCMP_CMP_EQ".into(),
                        },
                        SeccompArg {
                            index: 0,
                            value: 0xffff_ffff,
                            value_two: 131080,
                            op: "SCMP_CMP_MASKED_EQ".into(),
                        },
                    ],
                },
                SeccompSyscall {
                    names: vec!["kill".into()],
                    action: "SCMP_ACT_KILL_PROCESS".into(),
                    errno_ret: None,
                    args: vec![],
                },
            ],
        };
        assert_eq!(seccomp(&spec), Some(want));
    }

    #[test]
    fn rlimits_and_resources_translate() {
        let process: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096},
                {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}
            ]
        }))
        .expect("process");
        let rlimits = process_spec(&process).rlimits;
        assert_eq!(
            rlimits,
            vec![
                Rlimit {
                    resource: "RLIMIT_NOFILE".into(),
                    soft: 1024,
                    hard: 4096
                },
                Rlimit {
                    resource: "RLIMIT_CORE".into(),
                    soft: 0,
                    hard: 0
                },
            ]
        );
        assert_eq!(resources(&linux_spec(serde_json::json!({}))), None);
        assert_eq!(
            resources(&linux_spec(
                serde_json::json!({"resources": {"devices": []}})
            )),
            None,
            "device rules are the VM's"
        );
        // What containerd's CRI writes for a container limited to 64Mi and 500m.
        let spec = linux_spec(serde_json::json!({"resources": {
            "memory": {"limit": 67108864, "swap": 67108864},
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-3"},
            "pids": {"limit": 100},
            "hugepageLimits": []
        }}));
        assert_eq!(
            resources(&spec),
            Some(Resources {
                memory_limit: Some(64 << 20),
                memory_reservation: None,
                memory_swap: Some(64 << 20),
                cpu_shares: Some(512),
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                pids_limit: Some(100),
            })
        );
    }

    #[test]
    fn only_new_pid_ipc_uts_namespaces_reach_the_guest() {
        let cases = [
            (serde_json::json!({}), vec![]),
            (
                // containerd's CRI spec with pid per container: ipc/uts/net joined.
                serde_json::json!({"namespaces": [
                    {"type": "pid"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"},
                    {"type": "mount"},
                    {"type": "network", "path": "/proc/42/ns/net"}
                ]}),
                vec!["pid"],
            ),
            (
                serde_json::json!({"namespaces": [
                    {"type": "pid", "path": ""},
                    {"type": "ipc"},
                    {"type": "uts"},
                    {"type": "network"},
                    {"type": "cgroup"},
                    {"type": "user"},
                    {"type": "mount"}
                ]}),
                vec!["pid", "ipc", "uts"],
            ),
            (
                // The pod shares its pid namespace: nothing of its own.
                serde_json::json!({"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}),
                vec![],
            ),
        ];
        for (linux, want) in cases {
            let got = namespaces(&linux_spec(linux.clone()));
            let want: Vec<Namespace> = want
                .into_iter()
                .map(|t| Namespace {
                    ns_type: t.to_owned(),
                    path: String::new(),
                })
                .collect();
            assert_eq!(got, want, "{linux}");
        }
    }
}
