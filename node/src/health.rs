//! The reset-failure records the shim writes (`/run/gpuvm/health/<bdf>`), read for the
//! node's health. The record's format, default directory and reader are owned by
//! `gpuvm_pci::health`, shared with the shim that writes them; this module only turns
//! a read failure into the agent's error.
//!
//! A device with a record is unhealthy; a record on a companion function (HDMI audio…)
//! makes its GPU unhealthy, since they are passed and reset together.

use std::collections::BTreeMap;
use std::path::Path;

use gpuvm_pci::{HealthRecord, PciAddress};

use crate::{Error, Result};

pub use gpuvm_pci::DEFAULT_HEALTH_DIR;
pub use gpuvm_pci::health::NO_REASON_RECORDED;

/// Reads every reset-failure record in `dir`: device address → reason.
///
/// A missing directory means no failures; see [`HealthRecord::read_all`] for the
/// rest (strays ignored, an unreadable record still a failure).
pub fn read_reset_failures(dir: &Path) -> Result<BTreeMap<PciAddress, String>> {
    let records = HealthRecord::read_all(dir).map_err(|source| Error::HealthDir {
        path: dir.to_owned(),
        source,
    })?;
    Ok(records
        .into_iter()
        .map(|(address, record)| (address, record.reason().to_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;

    use super::*;

    // How records are read (strays, missing dir, long reasons) is tested where the
    // reader lives, in `gpuvm_pci::health`; here, only this module's mapping.
    #[test]
    fn records_become_address_to_reason() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0000:17:00.0"), "flr: timed out\n").unwrap();
        fs::write(dir.path().join("0000:18:00.1"), "").unwrap();
        let failures = read_reset_failures(dir.path()).unwrap();
        let got: Vec<(String, &str)> = failures
            .iter()
            .map(|(a, r)| (a.to_string(), r.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0000:17:00.0".to_owned(), "flr: timed out"),
                ("0000:18:00.1".to_owned(), NO_REASON_RECORDED),
            ]
        );
        assert!(
            read_reset_failures(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_unlistable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, "").unwrap();
        let err = read_reset_failures(&file).unwrap_err();
        assert!(
            err.to_string()
                .contains("could not list the health directory"),
            "{err}"
        );
    }
}
