//! `GpuAllocation`: the one record per node that says which machine owns each device.
//!
//! Every device held on a node is a key of `spec.devices`, so the record cannot even
//! express two owners for one device. Writers change it only with an update that carries
//! the resourceVersion they read (never an apply or a patch without one): of two writers
//! that read the same version, exactly one commits and the other gets a conflict, reads
//! again and decides again. A machine's `status` only mirrors what this record says.

use std::collections::{BTreeMap, BTreeSet};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::AllocatedGpu;

/// The devices of one node and the machine that owns each. Named like the node (and its
/// `GpuNode`); written only by the operator, always with a resourceVersion precondition.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gpuvm.dev",
    version = "v1alpha1",
    kind = "GpuAllocation",
    shortname = "ga",
    category = "gpuvm",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GpuAllocationSpec {
    /// Every allocated device of the node (GPUs and their companion functions), keyed
    /// by PCI address, with the machine that owns it. A device that is not listed is free.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, DeviceOwner>,
}

/// The machine that owns one device, and what its status needs to mirror the device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceOwner {
    /// Namespace of the owning GpuMachine.
    pub namespace: String,
    /// Name of the owning GpuMachine.
    pub name: String,
    /// UID of the owning GpuMachine: a machine deleted and created again under the same
    /// name is another owner.
    pub uid: String,
    /// The GPU this device is passed with: its own address for a GPU, the GPU's address
    /// for a companion function.
    pub gpu: String,
    /// GPU model of that GPU.
    pub model: String,
    /// IOMMU group of that GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// NUMA node of that GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i32>,
}

/// A machine as an owner of devices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

impl std::fmt::Display for MachineRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A claim refused because a device already has another owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clash {
    /// The contested PCI address.
    pub device: String,
    /// Its owner, `namespace/name`.
    pub holder: String,
}

impl std::fmt::Display for Clash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {} is already held by {}",
            self.device, self.holder
        )
    }
}

impl std::error::Error for Clash {}

impl GpuAllocationSpec {
    /// The GPUs `uid` holds here, sorted by address, each with its companion functions,
    /// in the same shape as a machine's `status.gpus`.
    pub fn holdings(&self, uid: &str) -> Vec<AllocatedGpu> {
        let mine: Vec<(&String, &DeviceOwner)> =
            self.devices.iter().filter(|(_, o)| o.uid == uid).collect();
        let mut gpus: Vec<AllocatedGpu> = mine
            .iter()
            .filter(|(addr, o)| **addr == o.gpu)
            .map(|(addr, o)| AllocatedGpu {
                pci_address: (*addr).clone(),
                model: o.model.clone(),
                iommu_group: o.iommu_group,
                numa_node: o.numa_node,
                companions: mine
                    .iter()
                    .filter(|(c, co)| co.gpu == **addr && *c != *addr)
                    .map(|(c, _)| (*c).clone())
                    .collect(),
            })
            .collect();
        gpus.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
        gpus
    }

    /// Records `gpus` (and their companions) as owned by `owner`, or refuses if any of
    /// them has another owner. If `owner` already holds devices here it is given nothing
    /// more: the answer is what it already holds (a retry, or a second writer placing the
    /// same machine, never allocates twice).
    pub fn claim(
        &mut self,
        owner: &MachineRef,
        gpus: &[AllocatedGpu],
    ) -> Result<Vec<AllocatedGpu>, Clash> {
        let held = self.holdings(&owner.uid);
        if !held.is_empty() {
            return Ok(held);
        }
        let wanted = gpus.iter().flat_map(|g| {
            std::iter::once(g.pci_address.as_str())
                .chain(g.companions.iter().map(String::as_str))
                .map(move |d| (d, g))
        });
        let mut entries = Vec::new();
        for (device, gpu) in wanted {
            if let Some(other) = self.devices.get(device) {
                return Err(Clash {
                    device: device.to_owned(),
                    holder: format!("{}/{}", other.namespace, other.name),
                });
            }
            entries.push((
                device.to_owned(),
                DeviceOwner {
                    namespace: owner.namespace.clone(),
                    name: owner.name.clone(),
                    uid: owner.uid.clone(),
                    gpu: gpu.pci_address.clone(),
                    model: gpu.model.clone(),
                    iommu_group: gpu.iommu_group,
                    numa_node: gpu.numa_node,
                },
            ));
        }
        self.devices.extend(entries);
        Ok(self.holdings(&owner.uid))
    }

    /// Drops every device `uid` owns; says whether anything changed. Releasing twice is
    /// harmless.
    pub fn release(&mut self, uid: &str) -> bool {
        let before = self.devices.len();
        self.devices.retain(|_, o| o.uid != uid);
        self.devices.len() != before
    }

    /// Every machine that owns something here.
    pub fn owners(&self) -> BTreeSet<MachineRef> {
        self.devices
            .values()
            .map(|o| MachineRef {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                uid: o.uid.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(addr: &str, companions: &[&str]) -> AllocatedGpu {
        AllocatedGpu {
            pci_address: addr.into(),
            model: "l40s".into(),
            iommu_group: Some(7),
            numa_node: Some(0),
            companions: companions.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn owner(name: &str) -> MachineRef {
        MachineRef {
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn claims_round_trip_through_holdings() {
        let mut spec = GpuAllocationSpec::default();
        let want = vec![
            gpu("0000:01:00.0", &["0000:01:00.1"]),
            gpu("0000:02:00.0", &[]),
        ];
        assert_eq!(spec.claim(&owner("a"), &want), Ok(want.clone()));
        assert_eq!(spec.devices.len(), 3);
        assert_eq!(spec.holdings("uid-a"), want);
        assert_eq!(spec.devices["0000:01:00.1"].gpu, "0000:01:00.0");
        assert!(spec.holdings("uid-b").is_empty());
        // Survives the API's JSON.
        let back: GpuAllocationSpec =
            serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn table_of_claims() {
        struct Case {
            name: &'static str,
            before: Vec<(&'static str, Vec<AllocatedGpu>)>,
            claimant: &'static str,
            claim: Vec<AllocatedGpu>,
            want: Result<Vec<&'static str>, &'static str>,
        }
        let cases = vec![
            Case {
                name: "free device",
                before: vec![],
                claimant: "a",
                claim: vec![gpu("0000:01:00.0", &[])],
                want: Ok(vec!["0000:01:00.0"]),
            },
            Case {
                name: "GPU held by another",
                before: vec![("b", vec![gpu("0000:01:00.0", &[])])],
                claimant: "a",
                claim: vec![gpu("0000:01:00.0", &[])],
                want: Err("0000:01:00.0"),
            },
            Case {
                name: "companion held by another",
                before: vec![("b", vec![gpu("0000:09:00.0", &["0000:01:00.1"])])],
                claimant: "a",
                claim: vec![gpu("0000:01:00.0", &["0000:01:00.1"])],
                want: Err("0000:01:00.1"),
            },
            Case {
                name: "second GPU of two held by another",
                before: vec![("b", vec![gpu("0000:02:00.0", &[])])],
                claimant: "a",
                claim: vec![gpu("0000:01:00.0", &[]), gpu("0000:02:00.0", &[])],
                want: Err("0000:02:00.0"),
            },
            Case {
                name: "claimant already holds other devices: keeps them, gets nothing more",
                before: vec![("a", vec![gpu("0000:03:00.0", &[])])],
                claimant: "a",
                claim: vec![gpu("0000:01:00.0", &[])],
                want: Ok(vec!["0000:03:00.0"]),
            },
        ];
        for case in cases {
            let mut spec = GpuAllocationSpec::default();
            for (who, gpus) in &case.before {
                spec.claim(&owner(who), gpus).unwrap();
            }
            let before = spec.clone();
            let got = spec.claim(&owner(case.claimant), &case.claim);
            match (got, case.want) {
                (Ok(held), Ok(want)) => {
                    let addrs: Vec<&str> = held.iter().map(|g| g.pci_address.as_str()).collect();
                    assert_eq!(addrs, want, "{}", case.name);
                }
                (Err(clash), Err(device)) => {
                    assert_eq!(clash.device, device, "{}", case.name);
                    assert_eq!(
                        spec, before,
                        "{}: a refused claim changes nothing",
                        case.name
                    );
                }
                (got, want) => panic!("{}: got {got:?}, want {want:?}", case.name),
            }
        }
    }

    #[test]
    fn release_is_idempotent_and_only_touches_the_owner() {
        let mut spec = GpuAllocationSpec::default();
        spec.claim(&owner("a"), &[gpu("0000:01:00.0", &["0000:01:00.1"])])
            .unwrap();
        spec.claim(&owner("b"), &[gpu("0000:02:00.0", &[])])
            .unwrap();
        assert!(spec.release("uid-a"));
        assert!(!spec.release("uid-a"));
        assert_eq!(
            spec.devices.keys().collect::<Vec<_>>(),
            vec!["0000:02:00.0"]
        );
        assert_eq!(
            spec.owners().into_iter().collect::<Vec<_>>(),
            vec![owner("b")]
        );
        // Freed devices can be claimed again.
        assert!(spec.claim(&owner("c"), &[gpu("0000:01:00.0", &[])]).is_ok());
    }
}
