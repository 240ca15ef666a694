//! Where the API server comes from: an existing cluster named by `KUBECONFIG`, or
//! binaries named by `KUBE_APISERVER` + `ETCD` (+ optional `KUBE_CONTROLLER_MANAGER`)
//! or found in a `KUBEBUILDER_ASSETS` directory (the envtest convention).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The reason printed when no API server is available.
pub const NO_SERVER: &str =
    "no API server (set KUBECONFIG, or KUBE_APISERVER and ETCD, or KUBEBUILDER_ASSETS)";

/// Binaries for a loopback control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assets {
    /// `kube-apiserver`.
    pub kube_apiserver: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
    /// `kube-controller-manager`, for garbage collection of owned Pods (optional).
    pub kube_controller_manager: Option<PathBuf>,
}

/// What the environment offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerSource {
    /// An existing cluster: the kubeconfig file to use.
    Kubeconfig(PathBuf),
    /// Binaries to start a loopback control plane from.
    Binaries(Assets),
    /// Nothing: the tests skip, for this reason.
    Unavailable(String),
}

/// Reads the process environment (see [`discover`]).
pub fn discover_from_env() -> anyhow::Result<ServerSource> {
    discover(&|key| std::env::var(key).ok(), &find_on_path)
}

/// Decides where the API server comes from. `env` reads a variable (empty counts as
/// unset); `on_path` finds a program on `PATH`. Order: `KUBECONFIG`; then
/// `KUBE_APISERVER` / `ETCD` / `KUBE_CONTROLLER_MANAGER`, each falling back to the file of
/// that name in `KUBEBUILDER_ASSETS`, and `etcd` falling back to `PATH` once an API server
/// binary was given. A variable that names a missing file is an error, not a skip: a
/// misconfigured run must not pass silently.
pub fn discover(
    env: &dyn Fn(&str) -> Option<String>,
    on_path: &dyn Fn(&str) -> Option<PathBuf>,
) -> anyhow::Result<ServerSource> {
    let var = |key: &str| env(key).filter(|v| !v.trim().is_empty());

    if let Some(list) = var("KUBECONFIG") {
        // Like kubectl, KUBECONFIG may list several files; kube merges them and so does
        // the operator (same library), so any existing one will do.
        let existing = std::env::split_paths(&list).find(|p| p.is_file());
        return match existing {
            Some(path) => Ok(ServerSource::Kubeconfig(path)),
            None => bail!("KUBECONFIG={list} names no existing file"),
        };
    }

    let assets_dir = var("KUBEBUILDER_ASSETS").map(PathBuf::from);
    if let Some(dir) = &assets_dir
        && !dir.is_dir()
    {
        bail!("KUBEBUILDER_ASSETS={} is not a directory", dir.display());
    }
    let from_dir = |name: &str| {
        assets_dir
            .as_ref()
            .map(|d| d.join(name))
            .filter(|p| p.is_file())
    };
    let given = |key: &str| -> anyhow::Result<Option<PathBuf>> {
        match var(key) {
            Some(v) => existing_file(key, Path::new(&v)).map(Some),
            None => Ok(None),
        }
    };

    let apiserver = given("KUBE_APISERVER")?.or_else(|| from_dir("kube-apiserver"));
    let etcd = given("ETCD")?.or_else(|| from_dir("etcd"));
    let kcm = given("KUBE_CONTROLLER_MANAGER")?.or_else(|| from_dir("kube-controller-manager"));

    let Some(kube_apiserver) = apiserver else {
        let reason = match (&assets_dir, &etcd) {
            (Some(dir), _) => format!("{NO_SERVER}: no kube-apiserver in {}", dir.display()),
            (None, Some(_)) => format!("{NO_SERVER}: ETCD is set but KUBE_APISERVER is not"),
            (None, None) => NO_SERVER.to_owned(),
        };
        return Ok(ServerSource::Unavailable(reason));
    };
    let etcd = match etcd.or_else(|| on_path("etcd")) {
        Some(etcd) => etcd,
        None => bail!(
            "kube-apiserver is given ({}) but etcd is not: set ETCD, put etcd in \
             KUBEBUILDER_ASSETS, or install it on PATH (Debian: etcd-server)",
            kube_apiserver.display()
        ),
    };
    Ok(ServerSource::Binaries(Assets {
        kube_apiserver,
        etcd,
        kube_controller_manager: kcm,
    }))
}

fn existing_file(key: &str, path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        // Absolute, so a child started in another directory finds it too.
        std::path::absolute(path).with_context(|| format!("{key}={}", path.display()))
    } else {
        bail!("{key}={} is not a file", path.display())
    }
}

/// Finds an executable file called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(vars: &[(&str, &str)], path_etcd: Option<&Path>) -> anyhow::Result<ServerSource> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let etcd = path_etcd.map(Path::to_path_buf);
        discover(&|k| vars.get(k).cloned(), &|name| {
            (name == "etcd").then(|| etcd.clone()).flatten()
        })
    }

    fn touch(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        p
    }

    #[test]
    fn nothing_set_skips_with_the_standard_reason() {
        assert_eq!(
            run(&[], None).unwrap(),
            ServerSource::Unavailable(NO_SERVER.to_owned())
        );
        // Empty values count as unset.
        assert_eq!(
            run(&[("KUBECONFIG", ""), ("KUBE_APISERVER", " ")], None).unwrap(),
            ServerSource::Unavailable(NO_SERVER.to_owned())
        );
        // etcd alone (Debian's package) is not enough.
        match run(&[("ETCD", "/bin/sh")], None).unwrap() {
            ServerSource::Unavailable(r) => assert!(r.contains("KUBE_APISERVER is not"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kubeconfig_wins_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let kc = touch(dir.path(), "config");
        let api = touch(dir.path(), "kube-apiserver");
        let list = format!("/nonexistent/a:{}", kc.display());
        assert_eq!(
            run(
                &[
                    ("KUBECONFIG", &list),
                    ("KUBE_APISERVER", api.to_str().unwrap())
                ],
                None
            )
            .unwrap(),
            ServerSource::Kubeconfig(kc)
        );
        let err = run(&[("KUBECONFIG", "/nonexistent/kc")], None).unwrap_err();
        assert!(err.to_string().contains("names no existing file"), "{err}");
    }

    #[test]
    fn explicit_binaries_with_etcd_from_path() {
        let dir = tempfile::tempdir().unwrap();
        let api = touch(dir.path(), "kube-apiserver");
        let etcd = touch(dir.path(), "etcd-3.5");
        let got = run(&[("KUBE_APISERVER", api.to_str().unwrap())], Some(&etcd)).unwrap();
        assert_eq!(
            got,
            ServerSource::Binaries(Assets {
                kube_apiserver: api.clone(),
                etcd: etcd.clone(),
                kube_controller_manager: None,
            })
        );
        let err = run(&[("KUBE_APISERVER", api.to_str().unwrap())], None).unwrap_err();
        assert!(err.to_string().contains("etcd is not"), "{err}");
        let err = run(&[("KUBE_APISERVER", "/nonexistent/kube-apiserver")], None).unwrap_err();
        assert!(err.to_string().contains("is not a file"), "{err}");
    }

    #[test]
    fn kubebuilder_assets_dir_with_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let api = touch(dir.path(), "kube-apiserver");
        let etcd = touch(dir.path(), "etcd");
        let kcm = touch(dir.path(), "kube-controller-manager");
        let other = tempfile::tempdir().unwrap();
        let other_etcd = touch(other.path(), "etcd");
        let assets = dir.path().to_str().unwrap();
        assert_eq!(
            run(&[("KUBEBUILDER_ASSETS", assets)], None).unwrap(),
            ServerSource::Binaries(Assets {
                kube_apiserver: api.clone(),
                etcd,
                kube_controller_manager: Some(kcm.clone()),
            })
        );
        assert_eq!(
            run(
                &[
                    ("KUBEBUILDER_ASSETS", assets),
                    ("ETCD", other_etcd.to_str().unwrap())
                ],
                None
            )
            .unwrap(),
            ServerSource::Binaries(Assets {
                kube_apiserver: api,
                etcd: other_etcd,
                kube_controller_manager: Some(kcm),
            })
        );
        let empty = tempfile::tempdir().unwrap();
        match run(
            &[("KUBEBUILDER_ASSETS", empty.path().to_str().unwrap())],
            None,
        )
        .unwrap()
        {
            ServerSource::Unavailable(r) => assert!(r.contains("no kube-apiserver in"), "{r}"),
            other => panic!("{other:?}"),
        }
        let err = run(&[("KUBEBUILDER_ASSETS", "/nonexistent/assets")], None).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
