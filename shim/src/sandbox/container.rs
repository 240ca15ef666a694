//! Containers in the sandbox's guest: the OCI spec translated to the agent's plain
//! types (pure), the rootfs under the virtio-fs share, and the agent calls around a
//! container's processes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use containerd_shim::protos::types::mount::Mount as ContainerdMount;

use super::Sandbox;
use crate::agent::{ContainerSpec, Mount as AgentMount, ProcessId, ProcessSpec};
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
    }
}

/// The OCI mounts the guest can honour: kernel filesystems (proc, sysfs, tmpfs, devpts,
/// mqueue…). Bind mounts name host paths the guest can't see and are left out.
pub fn guest_mounts(spec: &oci_spec::runtime::Spec) -> Vec<AgentMount> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| {
            let fs_type = m.typ().as_deref().unwrap_or("");
            let bind = fs_type == "bind"
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            !bind && !fs_type.is_empty() && !fs_type.starts_with("cgroup")
        })
        .map(|m| AgentMount {
            destination: m.destination().display().to_string(),
            fs_type: m.typ().clone().unwrap_or_default(),
            source: m
                .source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default(),
            options: m.options().clone().unwrap_or_default(),
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

/// Removes a container's rootfs mount and its directory.
pub fn remove_rootfs(mount: &Path) {
    crate::rootfs::unmount(mount);
    if let Some(parent) = mount.parent() {
        let _ = crate::host_path::remove_dir(parent);
    }
}

impl Sandbox {
    /// Mounts the container's rootfs under the share and creates the container in the
    /// guest (not started). Returns the rootfs mount; nothing is left on failure.
    pub async fn create_container(&self, req: &ContainerRequest<'_>) -> Result<PathBuf> {
        let process = req
            .spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the OCI spec has no process".into()))?;
        let target = self.rootfs_host(req.id);
        let root_path = req
            .spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        crate::rootfs::mount(req.rootfs, req.bundle, &root_path, &target)?;
        let mut process = process_spec(process);
        process.terminal = req.terminal || process.terminal;
        let container_spec = ContainerSpec {
            container_id: req.id.to_owned(),
            rootfs: self.rootfs_guest(req.id),
            process,
            mounts: guest_mounts(req.spec),
            readonly_rootfs: req
                .spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        };
        let creating = Instant::now();
        if let Err(e) = self.agent.create_container(&container_spec).await {
            crate::rootfs::unmount(&target);
            return Err(e);
        }
        self.count_container_time(creating, false);
        Ok(target)
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
    fn only_kernel_filesystems_reach_the_guest() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
                {"destination": "/etc/resolv.conf", "source": "/var/lib/x/resolv.conf", "options": ["bind", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ]
        }))
        .expect("spec");
        let mounts = guest_mounts(&spec);
        let destinations: Vec<&str> = mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(destinations, vec!["/proc", "/dev"]);
        assert_eq!(mounts[1].options, vec!["nosuid", "mode=755"]);
    }

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
    }
}
