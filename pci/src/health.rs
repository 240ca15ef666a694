//! Reset-failure records: the contract between the shim (writer) and the node agent
//! (reader) about devices that failed their reset.
//!
//! When the shim fails to reset a function after a VM (FLR, bus reset, …), it writes
//! `<dir>/<bdf>` (default [`DEFAULT_HEALTH_DIR`], so
//! `/run/gpuvm/health/0000:17:00.0`): UTF-8 text whose first non-blank line is the
//! reason, as a sentence. The write is atomic (a temp file whose name starts with `.`,
//! then a rename), and the record is removed after a later reset of that function
//! succeeds; an administrator may remove it to put a repaired device back into service.
//! `/run` is a tmpfs, so a reboot (which resets every device) clears the records. The
//! node agent only reads the directory: a function with a record is unhealthy, and a
//! record on a companion function (HDMI audio…) makes its GPU unhealthy, since they are
//! passed and reset together.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::PciAddress;

/// Where reset failures are recorded on a real node.
pub const DEFAULT_HEALTH_DIR: &str = "/run/gpuvm/health";

/// The reason read from a record that gives none.
pub const NO_REASON_RECORDED: &str = "no reason recorded";

/// Longest reason kept, in characters; the rest is cut on write and on read.
pub const MAX_REASON_CHARS: usize = 300;

/// One reset-failure record: why the function failed its reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRecord {
    reason: String,
}

impl HealthRecord {
    /// A record with this reason, kept to one line of at most [`MAX_REASON_CHARS`]
    /// characters (what the reader gets back).
    pub fn new(reason: &str) -> HealthRecord {
        let line = reason.split_whitespace().collect::<Vec<_>>().join(" ");
        let reason = if line.is_empty() {
            NO_REASON_RECORDED.to_owned()
        } else {
            line.chars().take(MAX_REASON_CHARS).collect()
        };
        HealthRecord { reason }
    }

    /// Why the function failed its reset.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The record's text: the reason on one line.
    pub fn format(&self) -> String {
        format!("{}\n", self.reason)
    }

    /// Reads a record's text: its first non-blank line, trimmed and cut to
    /// [`MAX_REASON_CHARS`]; an empty record says [`NO_REASON_RECORDED`].
    pub fn parse(text: &str) -> HealthRecord {
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .unwrap_or(NO_REASON_RECORDED);
        HealthRecord {
            reason: line.chars().take(MAX_REASON_CHARS).collect(),
        }
    }

    /// `<dir>/<bdf>`.
    pub fn path(dir: &Path, address: &PciAddress) -> PathBuf {
        dir.join(address.to_string())
    }

    /// Writes the record for `address` atomically (`.<bdf>.tmp`, then a rename),
    /// creating `dir` when needed.
    pub fn write(&self, dir: &Path, address: &PciAddress) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{address}.tmp"));
        fs::write(&tmp, self.format())?;
        fs::rename(&tmp, HealthRecord::path(dir, address))
    }

    /// Removes the record for `address`; none there is fine.
    pub fn remove(dir: &Path, address: &PciAddress) -> io::Result<()> {
        match fs::remove_file(HealthRecord::path(dir, address)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `address` has a record.
    pub fn exists(dir: &Path, address: &PciAddress) -> bool {
        HealthRecord::path(dir, address).exists()
    }

    /// Reads every record in `dir`: device address → record.
    ///
    /// A missing directory means no failures. Entries whose names are not PCI
    /// addresses (temp files, stray files) are ignored. A record that cannot be read
    /// still counts as a failure, with the read error as its reason: a device is never
    /// treated as healthy because its record was unreadable.
    pub fn read_all(dir: &Path) -> io::Result<BTreeMap<PciAddress, HealthRecord>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(err) => return Err(err),
        };
        let mut records = BTreeMap::new();
        for entry in entries {
            let entry = entry?;
            let Some(address) = entry
                .file_name()
                .to_str()
                .and_then(|name| PciAddress::parse(name).ok())
            else {
                continue;
            };
            let record = match fs::read_to_string(entry.path()) {
                Ok(text) => HealthRecord::parse(&text),
                Err(err) => HealthRecord::new(&format!(
                    "its record {} is unreadable ({err})",
                    entry.path().display()
                )),
            };
            records.insert(address, record);
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bdf(text: &str) -> PciAddress {
        PciAddress::parse(text).unwrap()
    }

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
        let records = HealthRecord::read_all(dir.path()).unwrap();
        let got: Vec<(String, &str)> = records
            .iter()
            .map(|(a, r)| (a.to_string(), r.reason()))
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
            HealthRecord::read_all(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn long_reasons_are_cut() {
        let read = HealthRecord::parse(&"x".repeat(1000));
        assert_eq!(read.reason().chars().count(), MAX_REASON_CHARS);
        let written = HealthRecord::new(&"y".repeat(1000));
        assert_eq!(written.reason().chars().count(), MAX_REASON_CHARS);
    }

    #[test]
    fn write_is_atomic_and_remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let health = dir.path().join("run/gpuvm/health");
        let gpu = bdf("0000:18:00.0");
        HealthRecord::new("flr: timed out\nsecond line")
            .write(&health, &gpu)
            .unwrap();
        assert!(HealthRecord::exists(&health, &gpu));
        assert_eq!(
            fs::read_to_string(health.join("0000:18:00.0")).unwrap(),
            "flr: timed out second line\n"
        );
        let names: Vec<_> = fs::read_dir(&health).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
        HealthRecord::remove(&health, &gpu).unwrap();
        assert!(!HealthRecord::exists(&health, &gpu));
        HealthRecord::remove(&health, &gpu).unwrap();
    }

    #[test]
    fn records_round_trip_through_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let reasons = [
            "0000:01:00.0 cannot be reset: it has no reset method",
            "  padded\treason  ",
            "",
            "ünïcode reason",
            &"z".repeat(MAX_REASON_CHARS + 5),
        ];
        for (i, reason) in reasons.iter().enumerate() {
            let address = PciAddress::new(0, i as u8 + 1, 0, 0).unwrap();
            let written = HealthRecord::new(reason);
            assert_eq!(
                HealthRecord::parse(&written.format()),
                written,
                "{reason:?}"
            );
            written.write(dir.path(), &address).unwrap();
        }
        let read = HealthRecord::read_all(dir.path()).unwrap();
        let want: Vec<HealthRecord> = reasons.iter().map(|r| HealthRecord::new(r)).collect();
        assert_eq!(read.into_values().collect::<Vec<_>>(), want);
        assert_eq!(HealthRecord::new("").reason(), NO_REASON_RECORDED);
        assert_eq!(
            HealthRecord::new("  padded\treason  ").reason(),
            "padded reason"
        );
    }
}
