//! Placement benchmark: prints figures, asserts nothing (the machines are noisy).
//!
//! `cargo bench -p gpuvm-operator --bench placement` reports, for 1,000 nodes × 8 GPUs:
//! - one placement on a built index (target ≤ 100 µs),
//! - building the index from the node views and allocations (what a reconcile pays),
//! - 10,000 placements in a row, each committed before the next.
//!
//! Under `cargo test --benches` it runs each part once, as a smoke test.

use std::collections::{BTreeMap, HashSet};
use std::hint::black_box;
use std::time::{Duration, Instant};

use gpuvm_api::{GpuDevice, IommuMember, MemberRole, PlacementStrategy};
use gpuvm_operator::scheduler::{Inventory, NodeView, PlacementRequest};

fn hgx(name: String) -> NodeView {
    let devices = (0..8u32)
        .map(|i| {
            let addr = format!("0000:{:02x}:00.0", 0x18 + i * 0x10);
            GpuDevice {
                pci_address: addr.clone(),
                vendor_id: "10de".into(),
                device_id: "2330".into(),
                model: "h100-80gb".into(),
                iommu_group: Some(10 + i),
                iommu_group_members: vec![IommuMember {
                    pci_address: addr,
                    role: MemberRole::Gpu,
                }],
                numa_node: Some(i32::from(i >= 4)),
                pcie_parent: Some(format!("0000:{:02x}:00.0", 0x10 + i / 2)),
                driver: Some("vfio-pci".into()),
                healthy: true,
                reason: None,
            }
        })
        .collect();
    NodeView {
        name,
        labels: BTreeMap::new(),
        ready: true,
        schedulable: true,
        devices,
        nvswitches: Vec::new(),
    }
}

fn request(count: u32) -> PlacementRequest {
    PlacementRequest {
        model: "h100-80gb".into(),
        count,
        node_selector: BTreeMap::new(),
        strategy: PlacementStrategy::BinPack,
    }
}

/// Median and minimum of `runs` timings of `f`.
fn time<R>(runs: usize, mut f: impl FnMut() -> R) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed()
        })
        .collect();
    samples.sort();
    (samples[samples.len() / 2], samples[0])
}

fn main() {
    let smoke = std::env::args().all(|a| a != "--bench");
    let runs = if smoke { 1 } else { 200 };
    let nodes: Vec<NodeView> = (0..1000).map(|i| hgx(format!("gpu-{i:04}"))).collect();
    // Half the fleet partly used, so bin-packing has real choices to rank.
    let mut allocations: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for n in nodes.iter().step_by(2) {
        allocations.insert(n.name.clone(), [n.devices[0].pci_address.clone()].into());
    }

    let (build_med, build_min) = time(runs.min(20), || Inventory::build(&nodes, &allocations));
    let inv = Inventory::build(&nodes, &allocations);
    let (one_med, one_min) = time(runs, || inv.place(&request(1)));
    let (four_med, four_min) = time(runs, || inv.place(&request(4)));
    let (eight_med, eight_min) = time(runs, || inv.place(&request(8)));

    let burst = if smoke { 100 } else { 10_000 };
    let mut inv = Inventory::build(&nodes, &BTreeMap::new());
    let t = Instant::now();
    let mut placed = 0;
    for i in 0..burst {
        let count = [1, 1, 2, 4, 1, 8, 2, 1][i % 8];
        if let Ok(p) = inv.place(&request(count)) {
            inv.commit(&p);
            placed += 1;
        }
    }
    let burst_time = t.elapsed();

    println!("placement over 1000 nodes x 8 GPUs (median / min):");
    println!(
        "  place 1 GPU on a built index:  {one_med:>10.1?} / {one_min:.1?}   (target <= 100us)"
    );
    println!("  place 4 GPUs:                  {four_med:>10.1?} / {four_min:.1?}");
    println!("  place 8 GPUs:                  {eight_med:>10.1?} / {eight_min:.1?}");
    println!("  build the index (per reconcile): {build_med:>8.1?} / {build_min:.1?}");
    println!(
        "  {burst} placements in a row (commit each): {burst_time:.1?} total, {:.1?} each, {placed} placed",
        burst_time / u32::try_from(burst).unwrap_or(1)
    );
}
