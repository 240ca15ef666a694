//! The in-guest GPU check: after boot the shim asks the agent which GPUs the guest
//! driver sees and compares them with what was passed. The result goes to a file the
//! node agent turns into the Pod annotation `gpuvm.dev/gpu-check` (the shim has no
//! API credentials): `<gpu_check_dir>/<namespace>_<name>`, the record whose format
//! `gpuvm_api::gpu_check` owns for both sides.
//!
//! The comparison is a pure function ([`compare_gpus`], [`gpu_check`]); this module
//! only adds the atomic write.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gpuvm_api::gpu_check::{self as record, GpuCheckRecord};

use crate::agent::GpuInfo;
use crate::error::Error;

/// The outcome of the check, as the record and the annotation carry it.
pub use gpuvm_api::gpu_check::GpuCheck;

/// The reason recorded when the guest has no NVIDIA driver.
pub const NO_DRIVER: &str = "no NVIDIA driver in the guest";

/// The models the guest must see: the `gpuvm.dev/gpu-models` annotation when present
/// (one per GPU), else the model names of the passed GPUs' device ids.
pub fn expected_models(annotation: Option<&str>, passed_device_ids: &[u16]) -> Vec<String> {
    match annotation {
        Some(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|m| m.trim().to_ascii_lowercase())
            .filter(|m| !m.is_empty())
            .collect(),
        _ => passed_device_ids
            .iter()
            .map(|id| gpuvm_pci::model_name(*id))
            .collect(),
    }
}

/// `2 x h100-80gb` or `1 x a100-80gb, 1 x l40s` (models in first-seen order).
pub fn summary(models: &[String]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for model in models {
        match counts.iter_mut().find(|(m, _)| m == model) {
            Some((_, n)) => *n += 1,
            None => counts.push((model, 1)),
        }
    }
    counts
        .iter()
        .map(|(m, n)| format!("{n} x {m}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn is_memory_token(token: &str) -> bool {
    token
        .strip_suffix("gb")
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Whether the guest driver's GPU name (`NVIDIA H100 80GB HBM3`) is the API model
/// (`h100-80gb`), loosely: the chip must appear as a word of the name, and so must
/// the memory size when the name states one. An unknown id's model
/// (`nvidia-<hex id>`) matches any name: there is nothing to compare.
pub fn name_matches(model: &str, name: &str) -> bool {
    let model_tokens = tokens(model);
    if model_tokens.len() == 2
        && model_tokens[0] == "nvidia"
        && model_tokens[1].len() == 4
        && model_tokens[1].chars().all(|c| c.is_ascii_hexdigit())
    {
        return true;
    }
    let name_tokens = tokens(name);
    let Some((chip, rest)) = model_tokens.split_first() else {
        return false;
    };
    if !name_tokens.contains(chip) {
        return false;
    }
    let name_states_memory = name_tokens.iter().any(|t| is_memory_token(t));
    rest.iter().all(|t| {
        if is_memory_token(t) && !name_states_memory {
            true
        } else {
            name_tokens.contains(t)
        }
    })
}

/// Compares the GPUs the guest reports with the models expected, one to one.
pub fn compare_gpus(expected: &[String], reported: &[GpuInfo]) -> GpuCheck {
    if reported.len() != expected.len() {
        let seen: Vec<&str> = reported.iter().map(|g| g.name.as_str()).collect();
        return GpuCheck::Failed(format!(
            "the guest sees {} GPU{}{}, {} passed ({})",
            reported.len(),
            if reported.len() == 1 { "" } else { "s" },
            if seen.is_empty() {
                String::new()
            } else {
                format!(" ({})", seen.join(", "))
            },
            if expected.len() == 1 {
                "1 was".to_owned()
            } else {
                format!("{} were", expected.len())
            },
            summary(expected)
        ));
    }
    let mut unused: Vec<&GpuInfo> = reported.iter().collect();
    for model in expected {
        match unused.iter().position(|g| name_matches(model, &g.name)) {
            Some(i) => {
                unused.remove(i);
            }
            None => {
                let names: Vec<String> = unused
                    .iter()
                    .map(|g| format!("{:?} at {}", g.name, g.pci_bus_id))
                    .collect();
                return GpuCheck::Failed(format!(
                    "the guest sees no {model}: expected {}, the unmatched guest GPUs are {}",
                    summary(expected),
                    names.join(", ")
                ));
            }
        }
    }
    GpuCheck::Ok(summary(expected))
}

/// The check from the agent's `GpuInfo` answer: a `FAILED_PRECONDITION` means the
/// guest has no NVIDIA driver.
pub fn gpu_check(expected: &[String], answer: Result<Vec<GpuInfo>, Error>) -> GpuCheck {
    match answer {
        Ok(gpus) => compare_gpus(expected, &gpus),
        Err(Error::GuestPrecondition(_)) => GpuCheck::Failed(NO_DRIVER.to_owned()),
        Err(e) => GpuCheck::Failed(format!(
            "the guest agent could not list GPUs: {}",
            e.full_message()
        )),
    }
}

/// `<dir>/<namespace>_<name>`; `None` when they are not Kubernetes names (so nothing
/// can reach outside `dir`).
pub fn record_path(dir: &Path, namespace: &str, name: &str) -> Option<PathBuf> {
    record::file_name(namespace, name).map(|file| dir.join(file))
}

/// Writes the record at `path` (from [`record_path`]) atomically: a temp file, then a
/// rename.
pub fn write_record(path: &Path, check: &GpuCheck, pod_uid: Option<&str>) -> io::Result<()> {
    let not_a_record = || io::Error::other(format!("{} is not a GPU check record", path.display()));
    let dir = path.parent().ok_or_else(not_a_record)?;
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(not_a_record)?;
    let (namespace, name) = record::split_file_name(file).ok_or_else(not_a_record)?;
    let text = GpuCheckRecord {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        check: check.clone(),
        pod_uid: pod_uid.map(str::to_owned),
    }
    .format();
    fs::create_dir_all(dir)?;
    let tmp = dir.join(record::temp_file_name(file));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, bus: &str) -> GpuInfo {
        GpuInfo {
            name: name.into(),
            uuid: format!("GPU-{bus}"),
            pci_bus_id: bus.into(),
        }
    }

    fn models(list: &[&str]) -> Vec<String> {
        list.iter().map(|m| (*m).to_owned()).collect()
    }

    #[test]
    fn expected_models_come_from_the_annotation_or_the_device_ids() {
        assert_eq!(
            expected_models(Some("H100-80GB, h100-80gb"), &[0x2330]),
            models(&["h100-80gb", "h100-80gb"])
        );
        assert_eq!(
            expected_models(None, &[0x2330, 0x26b9, 0x1234]),
            models(&["h100-80gb", "l40s", "nvidia-1234"])
        );
        assert_eq!(expected_models(Some(" "), &[0x27b8]), models(&["l4"]));
    }

    #[test]
    fn names_match_models_loosely() {
        let cases = [
            ("h100-80gb", "NVIDIA H100 80GB HBM3", true),
            ("h100-80gb", "NVIDIA H100 PCIe", true),
            ("h100-80gb", "NVIDIA H100 NVL 94GB", false),
            ("a100-40gb", "NVIDIA A100-SXM4-40GB", true),
            ("a100-40gb", "NVIDIA A100 80GB PCIe", false),
            ("l40s", "NVIDIA L40S", true),
            ("l40", "NVIDIA L40S", false),
            ("l4", "NVIDIA L40S", false),
            ("h200-141gb", "NVIDIA H200", true),
            ("nvidia-2b85", "NVIDIA GeForce RTX 5090", true),
            ("b200", "NVIDIA H100", false),
        ];
        for (model, name, want) in cases {
            assert_eq!(name_matches(model, name), want, "{model} vs {name}");
        }
    }

    #[test]
    fn comparison_table() {
        let h100 = |bus| gpu("NVIDIA H100 80GB HBM3", bus);
        let cases: Vec<(Vec<String>, Vec<GpuInfo>, &str)> = vec![
            (
                models(&["h100-80gb", "h100-80gb"]),
                vec![h100("00000000:00:05.0"), h100("00000000:00:06.0")],
                "ok: 2 x h100-80gb",
            ),
            (
                models(&["h100-80gb", "l40s"]),
                vec![gpu("NVIDIA L40S", "a"), h100("b")],
                "ok: 1 x h100-80gb, 1 x l40s",
            ),
            (
                models(&["h100-80gb", "h100-80gb"]),
                vec![h100("00000000:00:05.0")],
                "failed: the guest sees 1 GPU (NVIDIA H100 80GB HBM3), 2 were passed (2 x h100-80gb)",
            ),
            (
                models(&["h100-80gb"]),
                vec![],
                "failed: the guest sees 0 GPUs, 1 was passed (1 x h100-80gb)",
            ),
            (
                models(&["h100-80gb"]),
                vec![gpu("NVIDIA A100-SXM4-80GB", "00000000:00:05.0")],
                "failed: the guest sees no h100-80gb: expected 1 x h100-80gb, the unmatched guest GPUs are \"NVIDIA A100-SXM4-80GB\" at 00000000:00:05.0",
            ),
        ];
        for (expected, reported, want) in cases {
            assert_eq!(compare_gpus(&expected, &reported).to_string(), want);
        }
    }

    #[test]
    fn agent_errors_become_failures() {
        let expected = models(&["h100-80gb"]);
        let no_driver = Err(Error::GuestPrecondition(
            "GpuInfo: There is no NVIDIA driver in the guest".into(),
        ));
        assert_eq!(
            gpu_check(&expected, no_driver).to_string(),
            "failed: no NVIDIA driver in the guest"
        );
        let broken = Err(Error::AgentUnavailable("GpuInfo: closed".into()));
        assert_eq!(
            gpu_check(&expected, broken).to_string(),
            "failed: the guest agent could not list GPUs: guest agent unavailable: GpuInfo: closed"
        );
    }

    #[test]
    fn records_are_written_atomically_under_namespace_and_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = record_path(dir.path(), "team-a", "train-0").expect("valid");
        assert_eq!(path, dir.path().join("team-a_train-0"));
        write_record(&path, &GpuCheck::Ok("2 x h100-80gb".into()), Some("uid-1")).expect("write");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "ok: 2 x h100-80gb\npod-uid: uid-1\n"
        );
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
        assert!(record_path(dir.path(), "../etc", "x").is_none());
        assert!(record_path(dir.path(), "ns", "").is_none());
        // What the node agent reads back is what was written.
        let text = fs::read_to_string(&path).expect("read");
        let read = GpuCheckRecord::parse("team-a_train-0", &text).expect("a record");
        assert_eq!(read.check, GpuCheck::Ok("2 x h100-80gb".into()));
        assert_eq!(read.pod_uid.as_deref(), Some("uid-1"));
        assert!(write_record(&dir.path().join("README"), &read.check, None).is_err());
    }
}
