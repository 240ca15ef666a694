//! The in-guest GPU check: after boot the shim asks the agent which GPUs the guest
//! driver sees and compares them with what was passed. The result goes to a file the
//! node agent turns into the Pod annotation `gpuvm.dev/gpu-check` (the shim has no
//! API credentials): `<gpu_check_dir>/<namespace>_<name>`, the record whose format
//! `gpuvm_api::gpu_check` owns for both sides.
//!
//! The check runs at boot and then every `guest.gpu_check_interval` seconds
//! ([`GpuMonitor`]): the boot round compares the GPUs with the passed models
//! ([`compare_gpus`]); the first round that passes fixes the baseline of UUIDs, and
//! later rounds also fail on a GPU of the baseline that is gone, a UUID not in it, a
//! fatal Xid ([`fatal_xid`]) or the driver's error. The record is rewritten only when
//! the outcome changes. The comparisons are pure functions; this module only adds the
//! atomic write.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use gpuvm_api::gpu_check::{self as record, GpuCheckRecord};

use crate::agent::{GpuInfo, GpuReport, XidEvent};
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

/// The most GPUs a reason lists (a guest could claim thousands).
const MAX_LISTED: usize = 16;

/// `show` of each GPU, at most [`MAX_LISTED`] of them, then `…` when there are more.
fn quoted<'a>(
    gpus: impl IntoIterator<Item = &'a GpuInfo>,
    show: impl Fn(&GpuInfo) -> String,
) -> Vec<String> {
    let mut gpus = gpus.into_iter();
    let mut list: Vec<String> = gpus.by_ref().take(MAX_LISTED).map(show).collect();
    if gpus.next().is_some() {
        list.push("…".to_owned());
    }
    list
}

/// Compares the GPUs the guest reports with the models expected, one to one.
pub fn compare_gpus(expected: &[String], reported: &[GpuInfo]) -> GpuCheck {
    if reported.len() != expected.len() {
        let seen: Vec<String> = quoted(reported, |g| guest_text(&g.name));
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
                let names = quoted(unused.iter().copied(), |g| {
                    format!("{:?} at {}", guest_text(&g.name), guest_text(&g.pci_bus_id))
                });
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

/// Xids that mean the GPU, its memory, its link or its firmware is broken: the
/// machine's GPUs are no longer what was passed, whatever the tenant runs. From
/// NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors, "Analyzing Xid Errors
/// with the Xid Catalog"), whose immediate action for these is a GPU reset, a VM or
/// node restart or support, not restarting the application.
///
/// Not here, on purpose: the Xids a tenant's own program causes, whose catalog action
/// is `RESTART_APP` — 13 (graphics engine exception: an out-of-range access, an
/// illegal instruction in a kernel), 31 (GPU memory page fault: a kernel touching an
/// address it does not own), 43 (the channel of a faulting program was reset), 45
/// (preemptive cleanup after a process was killed), 68/69 (video decoder / engine
/// class errors). A tenant could otherwise mark its machine broken with one bad
/// kernel, and every CUDA developer's out-of-bounds bug would drain a node.
const FATAL_XIDS: &[(u32, &str)] = &[
    (48, "double-bit ECC error"),
    (62, "internal micro-controller halt"),
    (
        63,
        "ECC page retirement or row remapping recorded; the GPU needs a reset",
    ),
    (64, "ECC page retirement or row remapping failed"),
    (74, "NVLink error"),
    (79, "GPU has fallen off the bus"),
    (94, "contained ECC error"),
    (95, "uncontained ECC error"),
    (119, "GSP RPC timeout"),
    (120, "GSP error"),
    (140, "unrecovered ECC error"),
];

/// What a fatal Xid means, `None` for one that is not fatal (see [`FATAL_XIDS`]).
pub fn fatal_xid(code: u32) -> Option<&'static str> {
    FATAL_XIDS
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, meaning)| *meaning)
}

/// The longest piece of guest-supplied text a reason quotes (a GPU name, a log
/// line, the driver's error): the guest is not trusted, and the reason ends up in a
/// Pod annotation.
const MAX_GUEST_TEXT: usize = 160;

/// Guest-supplied `text` fit to quote: control characters become spaces, and it is
/// cut at [`MAX_GUEST_TEXT`] characters.
fn guest_text(text: &str) -> String {
    let mut out: String = text
        .trim()
        .chars()
        .take(MAX_GUEST_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().count() > MAX_GUEST_TEXT {
        out.push('…');
    }
    out
}

/// A fatal Xid as a reason.
fn xid_reason(xid: &XidEvent, meaning: &str) -> String {
    format!(
        "Xid {} ({meaning}) on {} at {:.1} s after boot: {}",
        xid.code,
        guest_text(&xid.pci_bus_id),
        xid.uptime_us as f64 / 1e6,
        guest_text(&xid.message)
    )
}

/// Compares the GPUs the guest sees now with those of the baseline, by UUID: a GPU
/// that is gone, one in its place, or one that was not there. `None` when they are
/// the same set.
pub fn compare_uuids(baseline: &[GpuInfo], reported: &[GpuInfo]) -> Option<String> {
    let has = |set: &[GpuInfo], uuid: &str| set.iter().any(|g| g.uuid == uuid);
    let gone = baseline.iter().find(|g| !has(reported, &g.uuid));
    let new = reported.iter().find(|g| !has(baseline, &g.uuid));
    let at = |g: &GpuInfo| format!("{} (at {})", guest_text(&g.uuid), guest_text(&g.pci_bus_id));
    match (gone, new) {
        (None, None) => None,
        (Some(gone), Some(new)) => Some(format!(
            "GPU {} is gone from the guest, which sees GPU {} instead: a different GPU \
             than the machine passed with",
            at(gone),
            at(new)
        )),
        (Some(gone), None) => Some(format!(
            "GPU {} is gone from the guest, which sees {} of the {} GPUs it passed with",
            at(gone),
            reported.iter().filter(|g| has(baseline, &g.uuid)).count(),
            baseline.len()
        )),
        (None, Some(new)) => Some(format!(
            "the guest sees GPU {}, which is not one of the {} it passed with",
            at(new),
            baseline.len()
        )),
    }
}

/// The periodic GPU check of one sandbox: what it expects, what it saw, and the last
/// outcome, so that only a change is recorded. Pure: the caller asks the agent.
#[derive(Debug, Clone)]
pub struct GpuMonitor {
    /// The models passed ([`expected_models`]).
    expected: Vec<String>,
    /// The GPUs of the first round that passed; later rounds compare UUIDs with them.
    baseline: Option<Vec<GpuInfo>>,
    /// The first fatal Xid seen. It stays: the agent keeps only the last 64 Xids, and
    /// a GPU that fell off the bus does not come back when a flood of others pushes
    /// its Xid out.
    fatal: Option<(XidEvent, &'static str)>,
    /// The outcome last recorded.
    last: Option<GpuCheck>,
}

impl GpuMonitor {
    /// A monitor for a guest passed GPUs of `expected` models.
    pub fn new(expected: Vec<String>) -> GpuMonitor {
        GpuMonitor {
            expected,
            baseline: None,
            fatal: None,
            last: None,
        }
    }

    /// The UUIDs' baseline, once a round passed.
    pub fn baseline(&self) -> Option<&[GpuInfo]> {
        self.baseline.as_deref()
    }

    /// One round with the agent's `answer`: the outcome when it differs from the last
    /// one (the first round always), else `None`.
    pub fn observe(&mut self, answer: Result<GpuReport, Error>) -> Option<GpuCheck> {
        if let Ok(report) = &answer
            && self.fatal.is_none()
        {
            self.fatal = report
                .xid_events
                .iter()
                .find_map(|x| fatal_xid(x.code).map(|meaning| (x.clone(), meaning)));
        }
        let check = self.evaluate(&answer);
        if let (GpuCheck::Ok(_), None, Ok(report)) = (&check, &self.baseline, &answer) {
            self.baseline = Some(report.gpus.clone());
        }
        if self.last.as_ref() == Some(&check) {
            return None;
        }
        self.last = Some(check.clone());
        Some(check)
    }

    /// The outcome of one round (the state is not changed): the agent's error, a
    /// fatal Xid, the driver's error, the baseline's UUIDs ([`compare_uuids`]), then
    /// the passed models ([`compare_gpus`]).
    fn evaluate(&self, answer: &Result<GpuReport, Error>) -> GpuCheck {
        let report = match answer {
            Ok(report) => report,
            Err(Error::GuestPrecondition(_)) => return GpuCheck::Failed(NO_DRIVER.to_owned()),
            Err(e) => {
                return GpuCheck::Failed(format!(
                    "the guest agent could not list GPUs: {}",
                    guest_text(&e.full_message())
                ));
            }
        };
        if let Some((xid, meaning)) = &self.fatal {
            return GpuCheck::Failed(xid_reason(xid, meaning));
        }
        if !report.driver_error.trim().is_empty() {
            return GpuCheck::Failed(format!(
                "the guest's NVIDIA driver is not usable: {}",
                guest_text(&report.driver_error)
            ));
        }
        // With a baseline the UUIDs name the GPU that is gone, where a count could not.
        if let Some(reason) = self
            .baseline
            .as_deref()
            .and_then(|baseline| compare_uuids(baseline, &report.gpus))
        {
            return GpuCheck::Failed(reason);
        }
        compare_gpus(&self.expected, &report.gpus)
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
        let no_driver = Err(Error::GuestPrecondition(
            "GpuInfo: There is no NVIDIA driver in the guest".into(),
        ));
        assert_eq!(
            monitor(1).observe(no_driver).map(|c| c.to_string()),
            Some("failed: no NVIDIA driver in the guest".into())
        );
        let broken = Err(Error::AgentUnavailable("GpuInfo: closed".into()));
        assert_eq!(
            monitor(1).observe(broken).map(|c| c.to_string()),
            Some(
                "failed: the guest agent could not list GPUs: guest agent unavailable: GpuInfo: closed"
                    .into()
            )
        );
    }

    /// NVML's view in a guest passed H100 SXM5s, as the agent answers `GpuInfo`
    /// (`gpuvm-gpu-check` under driver 550.163.01): GPU `i` at guest slot `5 + i`.
    fn h100s(count: usize) -> GpuReport {
        const UUIDS: [&str; 8] = [
            "GPU-5f8b2c3e-1a2b-4c3d-9e8f-0123456789ab",
            "GPU-0d6c87e4-7b3f-3a61-2d0e-9f1a2b3c4d5e",
            "GPU-9a1f3b22-64c1-d7a8-5e2b-c0ffee000002",
            "GPU-e2b7c541-0f3d-8c2a-41b6-7d9e1a2b3c4d",
            "GPU-71c4d9a0-2e8b-f35a-6c1d-0a9b8c7d6e5f",
            "GPU-3b8e2f10-9c7d-4a6b-e5f4-1d2c3b4a5f6e",
            "GPU-c6d5e4f3-a2b1-0c9d-8e7f-6a5b4c3d2e1f",
            "GPU-8f7e6d5c-4b3a-2918-0f1e-2d3c4b5a6978",
        ];
        GpuReport {
            driver_version: "550.163.01".into(),
            cuda_driver_version: 12040,
            gpus: UUIDS[..count]
                .iter()
                .enumerate()
                .map(|(i, uuid)| GpuInfo {
                    name: "NVIDIA H100 80GB HBM3".into(),
                    uuid: (*uuid).into(),
                    pci_bus_id: format!("00000000:00:{:02X}.0", 5 + i),
                })
                .collect(),
            modules: vec![
                "nvidia".into(),
                "nvidia-uvm".into(),
                "nvidia-modeset".into(),
            ],
            device_nodes: vec!["/dev/nvidiactl".into(), "/dev/nvidia0".into()],
            ..GpuReport::default()
        }
    }

    /// The Xid a guest kernel line `NVRM: Xid (PCI:0000:00:05): <code>, <message>`
    /// becomes, logged `secs` after boot.
    fn xid(code: u32, message: &str, secs: u64) -> XidEvent {
        XidEvent {
            pci_bus_id: "0000:00:05".into(),
            code,
            message: message.into(),
            uptime_us: secs * 1_000_000,
        }
    }

    const XID_79: &str = "pid='<unknown>', name=<unknown>, GPU has fallen off the bus.";
    const XID_13: &str = "pid=2211, name=python3, Graphics SM Warp Exception on (GPC 0, TPC 0, \
                          SM 0): Out Of Range Address";
    const XID_31: &str = "pid=2211, name=python3, Ch 00000008, intr 00000000. MMU Fault: ENGINE \
                          GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f_12340000. Fault is of type \
                          FAULT_PDE ACCESS_TYPE_VIRT_READ";

    /// A monitor for `count` H100s passed (device id 0x2330, no models annotation).
    fn monitor(count: usize) -> GpuMonitor {
        GpuMonitor::new(expected_models(None, &vec![0x2330; count]))
    }

    /// Runs `rounds` through a fresh monitor of `count` GPUs: what each round records
    /// (`None`: unchanged, nothing written).
    fn rounds(count: usize, rounds: Vec<GpuReport>) -> Vec<Option<String>> {
        let mut m = monitor(count);
        rounds
            .into_iter()
            .map(|r| m.observe(Ok(r)).map(|c| c.to_string()))
            .collect()
    }

    #[test]
    fn one_gpu_passes_at_boot_and_is_recorded_once() {
        let mut m = monitor(1);
        assert_eq!(
            m.observe(Ok(h100s(1))),
            Some(GpuCheck::Ok("1 x h100-80gb".into()))
        );
        assert_eq!(m.baseline(), Some(&h100s(1).gpus[..]));
        assert_eq!(m.observe(Ok(h100s(1))), None);
    }

    #[test]
    fn an_hgx_board_s_eight_gpus_pass_in_any_order() {
        let mut shuffled = h100s(8);
        shuffled.gpus.reverse();
        assert_eq!(
            rounds(8, vec![h100s(8), shuffled, h100s(8)]),
            vec![Some("ok: 8 x h100-80gb".into()), None, None]
        );
    }

    #[test]
    fn a_gpu_gone_after_boot_is_named_by_its_uuid() {
        let mut seven = h100s(8);
        seven.gpus.remove(3);
        assert_eq!(
            rounds(8, vec![h100s(8), seven.clone(), seven, h100s(8)]),
            vec![
                Some("ok: 8 x h100-80gb".into()),
                Some(
                    "failed: GPU GPU-e2b7c541-0f3d-8c2a-41b6-7d9e1a2b3c4d (at 00000000:00:08.0) \
                     is gone from the guest, which sees 7 of the 8 GPUs it passed with"
                        .into()
                ),
                None,
                Some("ok: 8 x h100-80gb".into()),
            ]
        );
        // Missing at boot: there is no baseline yet, the count says it.
        assert_eq!(
            rounds(2, vec![h100s(1)]),
            vec![Some(
                "failed: the guest sees 1 GPU (NVIDIA H100 80GB HBM3), 2 were passed (2 x h100-80gb)"
                    .into()
            )]
        );
    }

    #[test]
    fn a_different_uuid_than_at_boot_fails() {
        let mut swapped = h100s(2);
        swapped.gpus[1].uuid = "GPU-00000000-dead-beef-0000-000000000001".into();
        let mut extra = h100s(2);
        extra.gpus.push(swapped.gpus[1].clone());
        assert_eq!(
            rounds(2, vec![h100s(2), swapped]),
            vec![
                Some("ok: 2 x h100-80gb".into()),
                Some(
                    "failed: GPU GPU-0d6c87e4-7b3f-3a61-2d0e-9f1a2b3c4d5e (at 00000000:00:06.0) \
                     is gone from the guest, which sees GPU \
                     GPU-00000000-dead-beef-0000-000000000001 (at 00000000:00:06.0) instead: \
                     a different GPU than the machine passed with"
                        .into()
                ),
            ]
        );
        assert_eq!(
            compare_uuids(&h100s(2).gpus, &extra.gpus),
            Some(
                "the guest sees GPU GPU-00000000-dead-beef-0000-000000000001 (at \
                 00000000:00:06.0), which is not one of the 2 it passed with"
                    .into()
            )
        );
    }

    #[test]
    fn xid_79_fails_the_check_for_good() {
        let mut fallen = h100s(1);
        fallen.xid_events = vec![xid(13, XID_13, 100), xid(79, XID_79, 3600)];
        // The agent keeps the last 64 Xids: a flood of 13s pushes the 79 out.
        let mut flooded = h100s(1);
        flooded.xid_events = (0..64).map(|i| xid(13, XID_13, 3601 + i)).collect();
        assert_eq!(
            rounds(1, vec![h100s(1), fallen, flooded, h100s(1)]),
            vec![
                Some("ok: 1 x h100-80gb".into()),
                Some(
                    "failed: Xid 79 (GPU has fallen off the bus) on 0000:00:05 at 3600.0 s \
                     after boot: pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
                        .into()
                ),
                None,
                None,
            ]
        );
    }

    #[test]
    fn a_tenant_s_own_faults_do_not_fail_the_check() {
        let mut faulted = h100s(1);
        faulted.xid_events = vec![xid(13, XID_13, 50), xid(31, XID_31, 51), xid(43, "", 52)];
        assert_eq!(
            rounds(1, vec![h100s(1), faulted.clone()]),
            vec![Some("ok: 1 x h100-80gb".into()), None]
        );
        assert_eq!(
            rounds(1, vec![faulted]),
            vec![Some("ok: 1 x h100-80gb".into())]
        );
        for code in [13, 31, 43, 45, 68, 69] {
            assert_eq!(fatal_xid(code), None, "Xid {code}");
        }
        for code in [48, 63, 64, 74, 79, 94, 95, 119, 120] {
            assert!(fatal_xid(code).is_some(), "Xid {code}");
        }
    }

    #[test]
    fn the_driver_s_error_fails_until_the_driver_works() {
        let mut no_device = h100s(0);
        no_device.driver_error = "nvidia: No such device".into();
        no_device.modules.clear();
        assert_eq!(
            rounds(1, vec![no_device.clone(), no_device, h100s(1)]),
            vec![
                Some(
                    "failed: the guest's NVIDIA driver is not usable: nvidia: No such device"
                        .into()
                ),
                None,
                Some("ok: 1 x h100-80gb".into()),
            ]
        );
    }

    #[test]
    fn guest_text_in_a_reason_is_bounded() {
        let mut hostile = h100s(1);
        hostile.driver_error = format!("bad\n{}", "x".repeat(10_000));
        let check = monitor(1).observe(Ok(hostile)).expect("first round");
        let reason = check.to_string();
        assert!(!reason.contains('\n'), "{reason}");
        assert!(reason.chars().count() < 250, "{reason}");
        assert!(reason.ends_with("xxx…"), "{reason}");
        let mut many = h100s(0);
        many.gpus = (0..5000)
            .map(|i| gpu(&format!("NVIDIA H100 {i}"), "b"))
            .collect();
        let reason = monitor(1).observe(Ok(many)).expect("first").to_string();
        assert!(
            reason.len() < 2 * MAX_LISTED * MAX_GUEST_TEXT,
            "{}",
            reason.len()
        );
        assert!(reason.contains("…"), "{reason}");
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
