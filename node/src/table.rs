//! What a pass would do, as a table for `--dry-run`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use gpuvm_api::GpuNodeStatus;
use gpuvm_pci::{Inventory, PciAddress, VFIO_PCI_DRIVER};

use crate::labels::labels_for;

/// One change a pass makes outside the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedAction {
    /// Bind an IOMMU group's GPUs and companions to `vfio-pci`.
    BindGroup {
        /// The group number.
        group: u32,
        /// The functions to rebind, with the driver each is bound to now.
        devices: Vec<(PciAddress, Option<String>)>,
    },
    /// A GPU that is not on `vfio-pci` and will stay so, because binding is off.
    LeaveUnbound {
        /// The GPU.
        gpu: PciAddress,
        /// Its driver.
        driver: Option<String>,
    },
    /// Create or update the node's `GpuNode`.
    PublishGpuNode {
        /// Its name, the node's name.
        name: String,
    },
    /// Set (or remove) the agent's labels on the Node.
    LabelNode {
        /// The Node.
        name: String,
        /// The labels it will carry; owned labels not listed are removed.
        labels: BTreeMap<String, String>,
    },
}

impl fmt::Display for PlannedAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlannedAction::BindGroup { group, devices } => {
                write!(f, "bind IOMMU group {group} to vfio-pci:")?;
                for (i, (address, driver)) in devices.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    match driver {
                        Some(driver) => write!(f, "{sep}{address} (unbind from {driver})")?,
                        None => write!(f, "{sep}{address} (no driver)")?,
                    }
                }
                Ok(())
            }
            PlannedAction::LeaveUnbound { gpu, driver } => write!(
                f,
                "leave {gpu} on {} (binding is off: --no-bind)",
                driver.as_deref().unwrap_or("no driver")
            ),
            PlannedAction::PublishGpuNode { name } => {
                write!(f, "publish GpuNode {name} (status by server-side apply)")
            }
            PlannedAction::LabelNode { name, labels } if labels.is_empty() => {
                write!(f, "remove gpuvm labels from Node {name}")
            }
            PlannedAction::LabelNode { name, labels } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "label Node {name}: {}", labels.join(", "))
            }
        }
    }
}

/// The bindings a pass would make: one per IOMMU group of a passthrough-capable GPU
/// whose GPUs and companions are not all on `vfio-pci`. With binding off, each such GPU
/// is listed as left unbound instead.
pub fn planned_bindings(inventory: &Inventory, binding: bool) -> Vec<PlannedAction> {
    let mut seen = BTreeSet::new();
    let mut actions = Vec::new();
    for gpu in &inventory.gpus {
        let Some(group) = &gpu.iommu_group else {
            continue;
        };
        if !gpu.passthrough.is_capable() || gpu.group_bound_to_vfio() {
            continue;
        }
        if !binding {
            actions.push(PlannedAction::LeaveUnbound {
                gpu: gpu.address(),
                driver: gpu.device.driver.clone(),
            });
        } else if seen.insert(group.number) {
            actions.push(PlannedAction::BindGroup {
                group: group.number,
                devices: group
                    .passed_members()
                    .filter(|m| m.driver.as_deref() != Some(VFIO_PCI_DRIVER))
                    .map(|m| (m.address, m.driver.clone()))
                    .collect(),
            });
        }
    }
    actions
}

/// Everything a pass would do: the bindings, then (with a node name) publishing the
/// `GpuNode` and labelling the Node.
pub fn planned_actions(
    inventory: &Inventory,
    binding: bool,
    node_name: Option<&str>,
    status: &GpuNodeStatus,
) -> Vec<PlannedAction> {
    let mut actions = planned_bindings(inventory, binding);
    if let Some(name) = node_name {
        actions.push(PlannedAction::PublishGpuNode {
            name: name.to_owned(),
        });
        actions.push(PlannedAction::LabelNode {
            name: name.to_owned(),
            labels: labels_for(status),
        });
    }
    actions
}

/// Renders the status the agent would publish and the actions it would take.
pub fn render_table(status: &GpuNodeStatus, actions: &[PlannedAction]) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_table(&mut out, status, actions);
    out
}

fn write_table(out: &mut String, status: &GpuNodeStatus, actions: &[PlannedAction]) -> fmt::Result {
    writeln!(
        out,
        "IOMMU: {}   GPUs: {}   healthy: {}   NVSwitches: {}",
        if status.iommu_enabled { "on" } else { "off" },
        status.gpu_count,
        status.healthy_count,
        status.all_nvswitches().len()
    )?;
    if status.devices.is_empty() {
        writeln!(out, "no NVIDIA GPU found")?;
    } else {
        let header = [
            "ADDRESS", "MODEL", "GROUP", "MEMBERS", "NUMA", "PARENT", "DRIVER", "HEALTHY", "REASON",
        ];
        let rows: Vec<[String; 9]> = status
            .devices
            .iter()
            .map(|d| {
                [
                    d.pci_address.clone(),
                    d.model.clone(),
                    opt(d.iommu_group),
                    d.iommu_group_members
                        .iter()
                        .map(|m| format!("{}:{:?}", short(&m.pci_address), m.role))
                        .collect::<Vec<_>>()
                        .join(","),
                    opt(d.numa_node),
                    d.pcie_parent.clone().unwrap_or_else(|| "-".to_owned()),
                    d.driver.clone().unwrap_or_else(|| "-".to_owned()),
                    if d.healthy { "yes" } else { "no" }.to_owned(),
                    d.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        write_row(out, &header.map(str::to_owned), &widths)?;
        for row in &rows {
            write_row(out, row, &widths)?;
        }
    }
    let nvswitches = status.all_nvswitches();
    if !nvswitches.is_empty() {
        let switches: Vec<String> = nvswitches
            .iter()
            .map(|s| match s.model.as_str() {
                "" => s.pci_address.clone(),
                model => format!("{} ({model})", s.pci_address),
            })
            .collect();
        writeln!(out, "NVSwitches: {}", switches.join(", "))?;
    }
    if let Some(message) = &status.message {
        writeln!(out, "message: {message}")?;
    }
    if actions.is_empty() {
        writeln!(out, "actions: none")?;
    } else {
        writeln!(out, "actions:")?;
        for action in actions {
            writeln!(out, "  - {action}")?;
        }
    }
    Ok(())
}

fn write_row(out: &mut String, cells: &[String; 9], widths: &[usize; 9]) -> fmt::Result {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        write!(line, "{cell:<width$}  ")?;
    }
    writeln!(out, "{}", line.trim_end())
}

fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `0000:17:00.1` → `17:00.1`: the domain is almost always 0000 and the column is wide.
fn short(address: &str) -> &str {
    address.strip_prefix("0000:").unwrap_or(address)
}
