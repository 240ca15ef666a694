//! NVIDIA PCI device ids and the model names the API uses.
//!
//! Ids come from the PCI ID Repository (pci.ids, vendor 10de) and NVIDIA's own
//! product names. Several ids share one model: the API asks for a GPU by what a
//! workload cares about (chip and memory), not by form factor.

use serde::Serialize;

/// One known NVIDIA GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NvidiaModel {
    /// The PCI device id.
    pub device_id: u16,
    /// The model as `GpuMachine` specs name it: lowercase kebab, e.g. `h100-80gb`.
    pub model: &'static str,
    /// The product name, for people, e.g. `H100 SXM5 80GB`.
    pub product: &'static str,
}

const fn entry(device_id: u16, model: &'static str, product: &'static str) -> NvidiaModel {
    NvidiaModel {
        device_id,
        model,
        product,
    }
}

/// Every NVIDIA GPU this crate knows by name.
pub const NVIDIA_MODELS: &[NvidiaModel] = &[
    // Hopper.
    entry(0x2330, "h100-80gb", "H100 SXM5 80GB"),
    entry(0x2331, "h100-80gb", "H100 PCIe 80GB"),
    entry(0x2321, "h100-94gb", "H100 NVL 94GB"),
    entry(0x2335, "h200-141gb", "H200 SXM 141GB"),
    entry(0x233b, "h200-141gb", "H200 NVL 141GB"),
    // Ampere.
    entry(0x20b0, "a100-40gb", "A100 SXM4 40GB"),
    entry(0x20b1, "a100-40gb", "A100 PCIe 40GB"),
    entry(0x20f1, "a100-40gb", "A100 PCIe 40GB"),
    entry(0x20b2, "a100-80gb", "A100 SXM4 80GB"),
    entry(0x20b5, "a100-80gb", "A100 PCIe 80GB"),
    entry(0x2236, "a10", "A10"),
    // Ada Lovelace.
    entry(0x26b9, "l40s", "L40S"),
    entry(0x26b5, "l40", "L40"),
    entry(0x27b8, "l4", "L4"),
    // Blackwell.
    entry(0x2901, "b200", "B200"),
];

/// The known model for an NVIDIA device id, if any.
pub fn nvidia_model(device_id: u16) -> Option<&'static NvidiaModel> {
    NVIDIA_MODELS.iter().find(|m| m.device_id == device_id)
}

/// One known NVIDIA NVSwitch: the NVLink switch chip of an HGX/DGX GPU baseboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NvSwitchModel {
    /// The PCI device id.
    pub device_id: u16,
    /// The model as the API reports it, e.g. `h100-nvswitch`.
    pub model: &'static str,
    /// The NVSwitch generation (1 for HGX-2, 2 for HGX A100, 3 for HGX H100/H200).
    pub generation: u8,
    /// The baseboards it sits on, for people.
    pub platform: &'static str,
}

/// Every NVSwitch this crate knows by id (pci.ids names them "GA100 [A100 NVSwitch]" and
/// "GH100 [H100 NVSwitch]"). Fourth-generation NVSwitches (HGX B200/B300) are not on the
/// host's PCI bus at all, so no scan can list them; see `docs/nvswitch.md`.
pub const NVSWITCH_MODELS: &[NvSwitchModel] = &[
    NvSwitchModel {
        device_id: 0x1af1,
        model: "a100-nvswitch",
        generation: 2,
        platform: "HGX A100 / DGX A100",
    },
    NvSwitchModel {
        device_id: 0x22a3,
        model: "h100-nvswitch",
        generation: 3,
        platform: "HGX H100 / H200 / H800, DGX H100 / H200",
    },
];

/// The known NVSwitch for an NVIDIA device id, if any.
pub fn nvswitch_model(device_id: u16) -> Option<&'static NvSwitchModel> {
    NVSWITCH_MODELS.iter().find(|m| m.device_id == device_id)
}

/// The model name of an NVSwitch: the table's, or `nvidia-<id in 4 hex>` (every NVIDIA
/// function of class 0x0680 counts as an NVSwitch, known id or not).
pub fn nvswitch_model_name(device_id: u16) -> String {
    nvswitch_model(device_id).map_or_else(|| fallback_name(device_id), |m| m.model.to_owned())
}

fn fallback_name(device_id: u16) -> String {
    format!("nvidia-{device_id:04x}")
}

/// The model name for an NVIDIA device id: the table's, or `nvidia-<id in 4 hex>`.
pub fn model_name(device_id: u16) -> String {
    match nvidia_model(device_id) {
        Some(known) => known.model.to_owned(),
        None => fallback_name(device_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_known_ids() {
        let cases = [
            (0x2330, "h100-80gb"),
            (0x2331, "h100-80gb"),
            (0x2321, "h100-94gb"),
            (0x2335, "h200-141gb"),
            (0x233b, "h200-141gb"),
            (0x20b0, "a100-40gb"),
            (0x20b1, "a100-40gb"),
            (0x20b2, "a100-80gb"),
            (0x20b5, "a100-80gb"),
            (0x26b9, "l40s"),
            (0x26b5, "l40"),
            (0x27b8, "l4"),
            (0x2236, "a10"),
            (0x2901, "b200"),
        ];
        for (id, model) in cases {
            assert_eq!(model_name(id), model, "{id:04x}");
        }
        assert_eq!(nvidia_model(0x2330).unwrap().product, "H100 SXM5 80GB");
    }

    #[test]
    fn unknown_ids_get_a_stable_fallback() {
        assert!(nvidia_model(0x1eb8).is_none());
        assert_eq!(model_name(0x1eb8), "nvidia-1eb8");
        assert_eq!(model_name(0x0001), "nvidia-0001");
        assert_eq!(model_name(0xABCD), "nvidia-abcd");
    }

    #[test]
    fn nvswitch_ids_name_their_generation_and_unknown_ones_fall_back() {
        assert_eq!(nvswitch_model_name(0x1af1), "a100-nvswitch");
        assert_eq!(nvswitch_model_name(0x22a3), "h100-nvswitch");
        assert_eq!(nvswitch_model(0x22a3).map(|m| m.generation), Some(3));
        assert_eq!(nvswitch_model(0x1af1).map(|m| m.generation), Some(2));
        assert_eq!(nvswitch_model_name(0x22a4), "nvidia-22a4");
        // GPU ids are not NVSwitches, and the other way round.
        assert!(nvswitch_model(0x2330).is_none());
        assert!(nvidia_model(0x22a3).is_none());
    }

    #[test]
    fn table_is_consistent() {
        for (i, a) in NVIDIA_MODELS.iter().enumerate() {
            for b in &NVIDIA_MODELS[i + 1..] {
                assert_ne!(a.device_id, b.device_id, "{} listed twice", a.product);
            }
            let kebab = a.model.split('-').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            });
            assert!(kebab, "{} is not lowercase kebab", a.model);
        }
    }
}
