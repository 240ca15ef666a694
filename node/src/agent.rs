//! One pass over the host: scan, bind, look at `/dev/vfio` and the health records.
//! This is the sysfs side of the agent; [`crate::publish`] is the API side.

use std::collections::BTreeSet;
use std::path::PathBuf;

use gpuvm_api::GpuDevice;
use gpuvm_pci::{BindReport, Inventory, Sysfs, bind_group_to_vfio, scan};

use crate::health::read_reset_failures;
use crate::status::Observations;

/// Where the agent looks and whether it binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The sysfs root (`/sys`).
    pub sysfs_root: PathBuf,
    /// The dev root holding `vfio/<group>` (`/dev`).
    pub dev_root: PathBuf,
    /// The reset-failure directory (`/run/gpuvm/health`).
    pub health_dir: PathBuf,
    /// Whether to bind capable GPUs' groups to `vfio-pci`.
    pub bind: bool,
}

/// What one pass saw and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The scan the status is built from (taken after any binding).
    pub inventory: Inventory,
    /// The rest of what decides health.
    pub observations: Observations,
    /// The bindings made, one per group that needed writes.
    pub binds: Vec<BindReport>,
}

/// Runs one pass. With `apply` false (a dry run) nothing is written; the bindings that
/// would be made are for [`crate::planned_bindings`] to tell.
///
/// Binding is attempted only for passthrough-capable GPUs whose group is not all on
/// `vfio-pci`, once per group. When any binding wrote to sysfs, the host is scanned
/// again so the status shows the drivers the kernel actually bound.
pub fn observe(config: &AgentConfig, previous: Vec<GpuDevice>, apply: bool) -> Pass {
    let sysfs = Sysfs::new(&config.sysfs_root);
    let mut inventory = scan(&sysfs);
    let mut observations = Observations {
        binding: config.bind,
        dev_root: config.dev_root.clone(),
        previous,
        ..Observations::default()
    };
    let mut binds = Vec::new();
    if config.bind && apply {
        let mut groups_done = BTreeSet::new();
        for gpu in &inventory.gpus {
            let Some(group) = &gpu.iommu_group else {
                continue;
            };
            if !gpu.passthrough.is_capable()
                || gpu.group_bound_to_vfio()
                || !groups_done.insert(group.number)
            {
                continue;
            }
            match bind_group_to_vfio(&sysfs, &gpu.address()) {
                Ok(report) => {
                    tracing::info!(gpu = %gpu.address(), group = report.group, writes = report.writes.len(), "bound IOMMU group to vfio-pci");
                    binds.push(report);
                }
                Err(err) => {
                    let sentence = sentence(&err);
                    tracing::warn!(gpu = %gpu.address(), group = group.number, error = %sentence, "could not bind IOMMU group to vfio-pci");
                    // Every GPU of the group shares the failure.
                    for member in group.passed_members() {
                        observations
                            .bind_errors
                            .insert(member.address, sentence.clone());
                    }
                }
            }
        }
        if binds.iter().any(|b| !b.writes.is_empty()) {
            inventory = scan(&sysfs);
        }
    }
    observations.vfio_groups_present = inventory
        .gpus
        .iter()
        .filter_map(|gpu| gpu.iommu_group.as_ref())
        .map(|group| group.number)
        .filter(|number| {
            config
                .dev_root
                .join("vfio")
                .join(number.to_string())
                .exists()
        })
        .collect();
    match read_reset_failures(&config.health_dir) {
        Ok(failures) => observations.reset_failures = failures,
        Err(err) => observations.health_problems.push(sentence(&err)),
    }
    Pass {
        inventory,
        observations,
        binds,
    }
}

/// An error and its sources as one sentence.
pub fn sentence(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
