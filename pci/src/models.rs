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

/// The model name for an NVIDIA device id: the table's, or `nvidia-<id in 4 hex>`.
pub fn model_name(device_id: u16) -> String {
    match nvidia_model(device_id) {
        Some(known) => known.model.to_owned(),
        None => format!("nvidia-{device_id:04x}"),
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
