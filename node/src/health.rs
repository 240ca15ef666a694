//! The reset-failure contract between the shim and the node agent.
//!
//! When the shim fails to reset a device after a VM (FLR, bus reset, …), it writes
//! `<health dir>/<bdf>` (default `/run/gpuvm/health/0000:17:00.0`): UTF-8 text whose
//! first non-blank line is the reason, as a sentence. It writes the file atomically
//! (a temp file whose name starts with `.`, then a rename) and removes it after a later
//! reset of that device succeeds; an administrator may remove it to put a repaired
//! device back into service. `/run` is a tmpfs, so a reboot (which resets every device)
//! clears the records. The node agent only reads this directory, never writes it.
//!
//! A device with a record is unhealthy; a record on a companion function (HDMI audio…)
//! makes its GPU unhealthy, since they are passed and reset together.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use gpuvm_pci::PciAddress;

use crate::{Error, Result};

/// Where the shim records reset failures on a real node.
pub const DEFAULT_HEALTH_DIR: &str = "/run/gpuvm/health";

/// The reason used when a record is empty.
pub const NO_REASON_RECORDED: &str = "no reason recorded";

/// Longest reason kept from a record, in characters; the rest is cut.
const MAX_REASON_CHARS: usize = 300;

/// Reads every reset-failure record in `dir`: device address → reason.
///
/// A missing directory means no failures. Entries whose names are not PCI addresses
/// (temp files, stray files) are ignored. A record that cannot be read still counts
/// as a failure, with the read error as its reason: a device is never treated as
/// healthy because its record was unreadable.
pub fn read_reset_failures(dir: &Path) -> Result<BTreeMap<PciAddress, String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(Error::HealthDir {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut failures = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::HealthDir {
            path: dir.to_owned(),
            source,
        })?;
        let Some(address) = entry
            .file_name()
            .to_str()
            .and_then(|name| PciAddress::parse(name).ok())
        else {
            continue;
        };
        let reason = match fs::read_to_string(entry.path()) {
            Ok(text) => reason_from_record(&text),
            Err(err) => format!(
                "its record {} is unreadable ({err})",
                entry.path().display()
            ),
        };
        failures.insert(address, reason);
    }
    Ok(failures)
}

/// The reason a record gives: its first non-blank line, trimmed and cut to a sane length.
pub fn reason_from_record(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or(NO_REASON_RECORDED);
    line.chars().take(MAX_REASON_CHARS).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_records_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("0000:17:00.0"),
            "\n  flr: Inappropriate ioctl for device  \nmore detail\n",
        )
        .unwrap();
        fs::write(dir.path().join("0000:18:00.1"), "").unwrap();
        fs::write(dir.path().join(".0000:19:00.0.tmp"), "half written").unwrap();
        fs::write(dir.path().join("README"), "not a device").unwrap();
        let failures = read_reset_failures(dir.path()).unwrap();
        let got: Vec<(String, &str)> = failures
            .iter()
            .map(|(a, r)| (a.to_string(), r.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "0000:17:00.0".to_owned(),
                    "flr: Inappropriate ioctl for device"
                ),
                ("0000:18:00.1".to_owned(), NO_REASON_RECORDED),
            ]
        );
    }

    #[test]
    fn missing_directory_means_no_failures() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            read_reset_failures(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn long_reasons_are_cut() {
        let reason = reason_from_record(&"x".repeat(1000));
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
    }
}
