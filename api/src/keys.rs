//! Label, annotation, taint and finalizer keys: the contract between the operator, the
//! node agent and the shim. Changing one of these is an API change.

use gpuvm_pci::PciAddress;

/// Pod annotation: comma-separated PCI addresses (`0000:17:00.0,0000:17:00.1`) of every
/// device the VM gets, companion functions included, in the order they are passed.
pub const ANNOTATION_DEVICES: &str = "gpuvm.dev/devices";
/// Pod annotation: the guest's vCPU count (a positive integer).
pub const ANNOTATION_CPUS: &str = "gpuvm.dev/cpus";
/// Pod annotation: the guest's memory as a Kubernetes quantity (`16Gi`).
pub const ANNOTATION_MEMORY: &str = "gpuvm.dev/memory";
/// Pod annotation: the GPU models the guest must see, comma-separated, one per GPU.
pub const ANNOTATION_GPU_MODELS: &str = "gpuvm.dev/gpu-models";
/// Pod annotation written by the shim after boot: the outcome of the in-guest GPU check
/// (`ok: 2 x h100-80gb` or `failed: <reason>`). The operator mirrors it into `GPUReady`.
pub const ANNOTATION_GPU_CHECK: &str = "gpuvm.dev/gpu-check";
/// Pod annotation: the `metadata.generation` of the GpuMachine the Pod was built from.
pub const ANNOTATION_GENERATION: &str = "gpuvm.dev/generation";
/// Pod annotation: short digests of the machine's env, envFrom, volumes and volume
/// mounts the Pod was built from (`env=<hex>,envFrom=<hex>,...`), so a change of any of
/// them rolls out a new Pod without comparing fields the API server defaulted.
pub const ANNOTATION_SPEC_DIGEST: &str = "gpuvm.dev/spec-digest";
/// Pod label naming the owning GpuMachine, so the operator can map Pods back cheaply.
pub const LABEL_MACHINE: &str = "gpuvm.dev/machine";
/// Pod label carrying the machine's restart generation (0 for the first Pod).
pub const LABEL_RESTART: &str = "gpuvm.dev/restart";

/// Node label set by the node agent on every node that offers gpuvm GPUs.
pub const LABEL_GPU_NODE: &str = "gpuvm.dev/gpu-node";
/// Node label: the dominant GPU model of the node.
pub const LABEL_GPU_MODEL: &str = "gpuvm.dev/gpu.model";
/// Node label: how many passthrough-capable GPUs the node has.
pub const LABEL_GPU_COUNT: &str = "gpuvm.dev/gpu.count";
/// Taint key that keeps ordinary pods off GPU nodes (`gpuvm.dev/gpu-node:NoSchedule`).
pub const TAINT_GPU_NODE: &str = "gpuvm.dev/gpu-node";

/// Finalizer the operator puts on every GpuMachine so its GPUs are released only after
/// its Pod is gone.
pub const FINALIZER: &str = "gpuvm.dev/release-gpus";
/// The RuntimeClass (and containerd runtime handler) that routes Pods to the shim.
pub const RUNTIME_CLASS: &str = "gpuvm";
/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "gpuvm-operator";

/// The GPU model wildcard: any model will do.
pub const MODEL_ANY: &str = "any";

/// Splits a `gpuvm.dev/devices` annotation value into its items as written, skipping
/// empty items and surrounding blanks. [`parse_device_addresses`] reads the same items
/// as PCI addresses.
pub fn parse_devices(value: &str) -> Vec<String> {
    device_items(value).map(str::to_owned).collect()
}

/// Reads a `gpuvm.dev/devices` annotation value as PCI addresses (the items of
/// [`parse_devices`]), refusing the first item that is not one.
pub fn parse_device_addresses(value: &str) -> Result<Vec<PciAddress>, gpuvm_pci::Error> {
    device_items(value).map(PciAddress::parse).collect()
}

fn device_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_devices_trims_and_skips_empties() {
        assert_eq!(
            parse_devices(" 0000:17:00.0, 0000:17:00.1,,"),
            vec!["0000:17:00.0", "0000:17:00.1"]
        );
        assert!(parse_devices("").is_empty());
    }

    #[test]
    fn device_addresses_are_typed_and_checked() {
        let addresses = parse_device_addresses(" 0000:3B:00.0, 0000:3c:00.1,,").expect("valid");
        let text: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        assert_eq!(text, vec!["0000:3b:00.0", "0000:3c:00.1"]);
        assert_eq!(parse_device_addresses("").expect("empty"), Vec::new());
        for bad in ["3b:00.8", "0000:3b:00.8", "../../etc", "0000:3b:00"] {
            let err = parse_device_addresses(bad).expect_err(bad);
            assert!(
                err.to_string().contains("is not a PCI address"),
                "{bad}: {err}"
            );
        }
    }
}
