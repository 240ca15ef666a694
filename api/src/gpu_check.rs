//! The in-guest GPU check record: the contract between the shim (writer) and the node
//! agent (reader), and the value of the Pod annotation `gpuvm.dev/gpu-check`.
//!
//! After a GPU sandbox boots, the shim asks the guest agent which GPUs the guest driver
//! sees and writes the outcome to `<dir>/<namespace>_<pod name>` (default
//! [`DEFAULT_GPU_CHECK_DIR`]), atomically: [`temp_file_name`], then a rename. The text
//! ([`GpuCheckRecord::format`]) is one line with the [`GpuCheck`] (`ok: 2 x h100-80gb`
//! or `failed: <reason>`), then `pod-uid: <uid>` when the shim knows the Pod's UID.
//! The shim has no API credentials, so the node agent carries the first line to the
//! Pod annotation, where the operator reads it into the `GPUReady` condition.
//!
//! This module only formats and parses; the shim and the node agent do the I/O.

use std::fmt;

/// Where the shim writes the records on a real node (`/run` is a tmpfs: a reboot
/// clears them with the Pods they were about).
pub const DEFAULT_GPU_CHECK_DIR: &str = "/run/gpuvm/gpu-check";

/// The line that introduces the Pod's UID in a record.
const POD_UID_PREFIX: &str = "pod-uid:";

/// The outcome of the check, as the record's first line and the annotation carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuCheck {
    /// The guest sees what was passed: a summary like `2 x h100-80gb`.
    Ok(String),
    /// It does not, or cannot tell: the reason, as a sentence.
    Failed(String),
}

impl GpuCheck {
    /// Reads `ok: <summary>` or `failed: <reason>` (the colon and text are optional);
    /// `None` for anything else.
    pub fn parse(line: &str) -> Option<GpuCheck> {
        let line = line.trim();
        let text_after = |word: &str| {
            let rest = line.strip_prefix(word)?;
            (rest.is_empty() || rest.starts_with(':'))
                .then(|| rest.trim_start_matches(':').trim().to_owned())
        };
        text_after("ok")
            .map(GpuCheck::Ok)
            .or_else(|| text_after("failed").map(GpuCheck::Failed))
    }

    /// Whether the guest sees what was passed.
    pub fn is_ok(&self) -> bool {
        matches!(self, GpuCheck::Ok(_))
    }
}

impl fmt::Display for GpuCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, text) = match self {
            GpuCheck::Ok(summary) => ("ok", summary),
            GpuCheck::Failed(reason) => ("failed", reason),
        };
        if text.is_empty() {
            f.write_str(word)
        } else {
            write!(f, "{word}: {text}")
        }
    }
}

/// One record: which Pod it is about, the outcome, and the Pod's UID when known (so a
/// record is never applied to a newer Pod of the same name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCheckRecord {
    /// The Pod's namespace.
    pub namespace: String,
    /// The Pod's name.
    pub name: String,
    /// The outcome.
    pub check: GpuCheck,
    /// The Pod's UID, when the shim knew it.
    pub pod_uid: Option<String>,
}

impl GpuCheckRecord {
    /// The record's file name, `<namespace>_<name>`.
    pub fn file_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }

    /// The record's text: the check on one line, then `pod-uid: <uid>` when known.
    pub fn format(&self) -> String {
        let mut text = format!("{}\n", self.check.to_string().replace('\n', " "));
        if let Some(uid) = self.pod_uid.as_deref().map(str::trim)
            && !uid.is_empty()
        {
            text.push_str(&format!("{POD_UID_PREFIX} {uid}\n"));
        }
        text
    }

    /// Reads a record from its file name and text; `None` for names that are not
    /// `<namespace>_<name>` (temp files, strays) and for texts whose first non-blank
    /// line is not a [`GpuCheck`].
    pub fn parse(file_name: &str, text: &str) -> Option<GpuCheckRecord> {
        let (namespace, name) = split_file_name(file_name)?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let check = GpuCheck::parse(lines.next()?)?;
        let pod_uid = lines
            .filter_map(|l| l.strip_prefix(POD_UID_PREFIX))
            .map(|uid| uid.trim().to_owned())
            .find(|uid| !uid.is_empty());
        Some(GpuCheckRecord {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            check,
            pod_uid,
        })
    }
}

/// The file name of the record about Pod `namespace/name`; `None` when they are not
/// Kubernetes names (so a name can never reach outside the directory).
pub fn file_name(namespace: &str, name: &str) -> Option<String> {
    (is_object_name(namespace) && is_object_name(name)).then(|| format!("{namespace}_{name}"))
}

/// Splits a record's file name into the Pod's namespace and name.
pub fn split_file_name(file_name: &str) -> Option<(&str, &str)> {
    let (namespace, name) = file_name.split_once('_')?;
    (is_object_name(namespace) && is_object_name(name)).then_some((namespace, name))
}

/// The name the writer gives the record while writing it, before the rename; readers
/// skip it, since it is not a [`split_file_name`] name.
pub fn temp_file_name(file_name: &str) -> String {
    format!(".{file_name}.tmp")
}

/// A Kubernetes namespace or Pod name (DNS-1123): lowercase letters, digits, `-` and
/// `.`, starting and ending with a letter or digit. Never `_`, so the file name splits
/// in one way only.
fn is_object_name(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(file: &str, check: GpuCheck, uid: Option<&str>) -> GpuCheckRecord {
        let (namespace, name) = split_file_name(file).expect("valid name");
        GpuCheckRecord {
            namespace: namespace.into(),
            name: name.into(),
            check,
            pod_uid: uid.map(Into::into),
        }
    }

    #[test]
    fn checks_read_and_print_the_annotation_value() {
        let cases = [
            (
                "ok: 2 x h100-80gb",
                Some(GpuCheck::Ok("2 x h100-80gb".into())),
            ),
            (
                "  failed:no driver ",
                Some(GpuCheck::Failed("no driver".into())),
            ),
            ("ok", Some(GpuCheck::Ok(String::new()))),
            ("failed", Some(GpuCheck::Failed(String::new()))),
            ("okay", None),
            ("maybe", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(GpuCheck::parse(line), want, "{line:?}");
        }
        assert_eq!(GpuCheck::Ok("1 x l4".into()).to_string(), "ok: 1 x l4");
        assert_eq!(GpuCheck::Failed("x".into()).to_string(), "failed: x");
        assert!(GpuCheck::Ok(String::new()).is_ok());
        assert!(!GpuCheck::Failed(String::new()).is_ok());
    }

    #[test]
    fn records_parse_from_name_and_text() {
        assert_eq!(
            GpuCheckRecord::parse("team-a_train-0", "ok: 2 x h100-80gb\npod-uid: u1\n"),
            Some(record(
                "team-a_train-0",
                GpuCheck::Ok("2 x h100-80gb".into()),
                Some("u1")
            ))
        );
        assert_eq!(
            GpuCheckRecord::parse("ns_p", "\nfailed: no NVIDIA driver in the guest\n"),
            Some(record(
                "ns_p",
                GpuCheck::Failed("no NVIDIA driver in the guest".into()),
                None
            ))
        );
        for (file, text) in [
            (".ns_p.tmp", "ok: 1 x l4"),
            ("README", "ok: 1 x l4"),
            ("ns_", "ok: 1 x l4"),
            ("ns_p", "maybe"),
            ("ns_p", ""),
        ] {
            assert_eq!(GpuCheckRecord::parse(file, text), None, "{file}: {text}");
        }
        let temp = temp_file_name("ns_p");
        assert_eq!(temp, ".ns_p.tmp");
        assert_eq!(split_file_name(&temp), None);
    }

    #[test]
    fn file_names_are_kubernetes_names_only() {
        assert_eq!(
            file_name("team-a", "train-0").as_deref(),
            Some("team-a_train-0")
        );
        for (namespace, name) in [
            ("../etc", "x"),
            ("ns", ""),
            ("ns", "a/b"),
            ("NS", "p"),
            (".", "p"),
        ] {
            assert_eq!(file_name(namespace, name), None, "{namespace}/{name}");
        }
    }

    #[test]
    fn the_written_text_is_what_the_shim_always_wrote() {
        let r = record(
            "ns_p",
            GpuCheck::Failed("line one\nline two".into()),
            Some("uid-1"),
        );
        assert_eq!(r.format(), "failed: line one line two\npod-uid: uid-1\n");
        let r = record("ns_p", GpuCheck::Ok("1 x l4".into()), Some(""));
        assert_eq!(r.format(), "ok: 1 x l4\n");
    }

    proptest! {
        #[test]
        fn records_round_trip(
            namespace in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            name in "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?",
            ok in any::<bool>(),
            text in "([A-Za-z0-9(),:-]+( [A-Za-z0-9(),:-]+)*)?",
            uid in proptest::option::of("[a-f0-9-]{1,36}"),
        ) {
            let check = if ok { GpuCheck::Ok(text) } else { GpuCheck::Failed(text) };
            let written = GpuCheckRecord { namespace, name, check, pod_uid: uid };
            let file = file_name(&written.namespace, &written.name).expect("valid name");
            prop_assert_eq!(&file, &written.file_name());
            prop_assert_eq!(GpuCheckRecord::parse(&file, &written.format()), Some(written.clone()));
            prop_assert_eq!(GpuCheck::parse(&written.check.to_string()), Some(written.check));
        }
    }
}
