//! Scan of a 1,000-function fake sysfs tree (target: ≤ 50 ms).
//!
//! `cargo bench -p gpuvm-pci --bench scan` prints min/median/mean/max over many
//! scans. Run without `--bench` (as `cargo test --all-targets` does) it scans once,
//! as a smoke test.

use std::time::{Duration, Instant};

use gpuvm_pci::scan;
use gpuvm_pci::testing::presets;

const DEVICES: usize = 1_000;
const ITERATIONS: usize = 100;

fn main() -> std::io::Result<()> {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let fake = presets::large(DEVICES).build()?;
    let sysfs = fake.sysfs();

    // Warm the dentry cache, and check the tree is what it claims to be.
    let inventory = scan(&sysfs);
    assert_eq!(inventory.devices_scanned, DEVICES);
    assert!(inventory.problems.is_empty(), "{:?}", inventory.problems);
    if !benchmarking {
        return Ok(());
    }

    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let start = Instant::now();
            let inventory = scan(&sysfs);
            let elapsed = start.elapsed();
            std::hint::black_box(inventory);
            elapsed
        })
        .collect();
    times.sort();
    let mean = times.iter().sum::<Duration>() / ITERATIONS as u32;
    println!(
        "scan of {DEVICES} functions ({} GPUs, {} in groups read): \
         min {:.2?}  median {:.2?}  mean {:.2?}  max {:.2?}  ({ITERATIONS} runs)",
        inventory.gpus.len(),
        inventory
            .gpus
            .iter()
            .filter(|gpu| gpu.iommu_group.is_some())
            .count(),
        times[0],
        times[ITERATIONS / 2],
        mean,
        times[ITERATIONS - 1],
    );
    Ok(())
}
