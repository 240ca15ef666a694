//! Test fixtures shared by the operator's unit tests.

use gpuvm_api::{
    AllocatedGpu, GpuMachine, GpuMachineSpec, GpuMachineStatus, GpuRequest, GuestResources,
};

/// An l40s GPU at `pci_address` with its `companions` (the audio function).
pub(crate) fn l40s(pci_address: &str, companions: &[&str]) -> AllocatedGpu {
    AllocatedGpu {
        pci_address: pci_address.into(),
        model: "l40s".into(),
        iommu_group: None,
        numa_node: None,
        companions: companions.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// Machine `name` asking for one l40s (1 CPU, 1Gi), placed on node `n1` with `gpus`.
pub(crate) fn placed(name: &str, gpus: Vec<AllocatedGpu>) -> GpuMachine {
    let mut m = GpuMachine::new(
        name,
        GpuMachineSpec {
            image: "x".into(),
            gpu: GpuRequest {
                model: "l40s".into(),
                count: 1,
            },
            guest: GuestResources {
                cpus: 1,
                memory: "1Gi".into(),
            },
            ..Default::default()
        },
    );
    m.status = Some(GpuMachineStatus {
        node_name: Some("n1".into()),
        gpus,
        ..GpuMachineStatus::default()
    });
    m
}
