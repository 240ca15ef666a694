//! The one rule for tests that need what a machine may lack: print `SKIPPED: <reason>`
//! and pass, unless `GPUVM_REQUIRE` names the requirement, in which case fail.
//!
//! `GPUVM_REQUIRE` is a comma-separated list of [`Requirement`] names (`apiserver`,
//! `kvm`, `gpu`, `cloud-hypervisor`, …) or `all`. CI sets it for everything CI can run.

use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;

/// The environment variable that turns skips into failures.
pub const REQUIRE_VAR: &str = "GPUVM_REQUIRE";

/// Something a test may need that a machine may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// A Kubernetes API server (`KUBECONFIG`, or `KUBE_APISERVER` + `ETCD`, or
    /// `KUBEBUILDER_ASSETS`).
    ApiServer,
    /// kube-controller-manager next to the API server (garbage collection, namespace
    /// deletion).
    ControllerManager,
    /// KVM that boots real guest kernels (not PVM).
    Kvm,
    /// A GPU bound to vfio-pci (`GPUVM_TEST_GPU`).
    Gpu,
    /// The `cloud-hypervisor` binary (`CLOUD_HYPERVISOR_BIN`) and `/dev/kvm`.
    CloudHypervisor,
    /// Cloud Hypervisor's OpenAPI spec for the contract test.
    ChOpenapi,
    /// QEMU, vhost-device-vsock and virtiofsd (`scripts/vm-deps.sh`) and the guest image.
    Qemu,
    /// containerd 2.x and runc (`scripts/containerd-deps.sh`).
    Containerd,
    /// Root (mount namespaces, loop devices, containerd).
    Root,
    /// The CNI plugins bridge, host-local and loopback (`scripts/cni-deps.sh`).
    Cni,
    /// The GPU flavour of the guest image (`guest/build.sh --gpu`): NVIDIA's open
    /// kernel modules and user-space driver, booted under QEMU without a GPU.
    GpuImage,
}

impl Requirement {
    /// Every requirement, in the order `--help` texts list them.
    pub const ALL: [Requirement; 11] = [
        Requirement::ApiServer,
        Requirement::ControllerManager,
        Requirement::Kvm,
        Requirement::Gpu,
        Requirement::CloudHypervisor,
        Requirement::ChOpenapi,
        Requirement::Qemu,
        Requirement::Containerd,
        Requirement::Root,
        Requirement::Cni,
        Requirement::GpuImage,
    ];

    /// The name used in `GPUVM_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Requirement::ApiServer => "apiserver",
            Requirement::ControllerManager => "controller-manager",
            Requirement::Kvm => "kvm",
            Requirement::Gpu => "gpu",
            Requirement::CloudHypervisor => "cloud-hypervisor",
            Requirement::ChOpenapi => "ch-openapi",
            Requirement::Qemu => "qemu",
            Requirement::Containerd => "containerd",
            Requirement::Root => "root",
            Requirement::Cni => "cni",
            Requirement::GpuImage => "gpu-image",
        }
    }

    fn from_name(name: &str) -> Option<Requirement> {
        Requirement::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `GPUVM_REQUIRE` asks for, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Required {
    all: bool,
    names: Vec<Requirement>,
}

impl Required {
    /// Parses a `GPUVM_REQUIRE` value: a comma list of names, `all`, or empty.
    pub fn parse(value: &str) -> Result<Required, String> {
        let mut required = Required::default();
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "all" {
                required.all = true;
            } else if let Some(r) = Requirement::from_name(item) {
                required.names.push(r);
            } else {
                let known: Vec<&str> = Requirement::ALL.iter().map(|r| r.name()).collect();
                return Err(format!(
                    "{REQUIRE_VAR} names {item:?}, which is not a requirement; known: all, {}",
                    known.join(", ")
                ));
            }
        }
        Ok(required)
    }

    /// From the environment. An unparsable value panics: a test run whose strictness
    /// cannot be known must not pass.
    pub fn from_env() -> Required {
        let value = std::env::var(REQUIRE_VAR).unwrap_or_default();
        match Required::parse(&value) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    /// Whether `r` must be present.
    pub fn contains(&self, r: Requirement) -> bool {
        self.all || self.names.contains(&r)
    }
}

/// Whether `GPUVM_REQUIRE` names `r` (or is `all`).
pub fn required(r: Requirement) -> bool {
    Required::from_env().contains(r)
}

/// Writes a line to the real stderr, past libtest's output capture, so `SKIPPED:` notes
/// and figures show up in a plain `cargo test` log.
pub fn note(line: &str) {
    let mut err = std::io::stderr().lock();
    // Best effort: a closed stderr must not fail a test.
    let _ = writeln!(err, "{line}");
}

/// The test cannot run because `r` is missing: prints `SKIPPED: <reason>` and returns,
/// or panics when `GPUVM_REQUIRE` names `r`. Call it, then `return` from the test.
#[track_caller]
pub fn skip(r: Requirement, reason: &str) {
    if required(r) {
        panic!("{REQUIRE_VAR} requires {r}, but it is missing: {reason}");
    }
    note(&format!("SKIPPED: {reason}"));
}

/// `name` on `PATH`, in cargo's bin dir (`$CARGO_HOME/bin`, `~/.cargo/bin`) or in
/// `/usr/libexec` (Debian's virtiofsd): where the VM tests' helper binaries are.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/libexec"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_all_and_empty() {
        let r = Required::parse("apiserver, cloud-hypervisor").expect("valid");
        assert!(r.contains(Requirement::ApiServer));
        assert!(r.contains(Requirement::CloudHypervisor));
        assert!(!r.contains(Requirement::Gpu));

        let all = Required::parse("all").expect("valid");
        assert!(Requirement::ALL.iter().all(|&x| all.contains(x)));

        let none = Required::parse(" , ").expect("valid");
        assert!(Requirement::ALL.iter().all(|&x| !none.contains(x)));
    }

    #[test]
    fn an_unknown_name_is_an_error_that_lists_the_known_ones() {
        let e = Required::parse("apiserver,cloudhypervisor").expect_err("typo");
        assert!(e.contains("\"cloudhypervisor\""), "{e}");
        assert!(e.contains("cloud-hypervisor"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for r in Requirement::ALL {
            assert_eq!(Requirement::from_name(r.name()), Some(r));
            assert_eq!(r.to_string(), r.name());
        }
    }
}
