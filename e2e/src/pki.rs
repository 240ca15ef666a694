//! Certificates for a loopback control plane, made with the `openssl` CLI: a CA, a
//! serving certificate for 127.0.0.1, an admin client certificate in `system:masters`,
//! and the service-account signing key pair.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The files [`generate`] writes.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (trusted by clients, and the apiserver's `--client-ca-file`).
    pub ca_cert: PathBuf,
    /// CA private key.
    pub ca_key: PathBuf,
    /// Serving certificate, SANs `IP:127.0.0.1`, `DNS:localhost` and the in-cluster names.
    pub server_cert: PathBuf,
    /// Serving key.
    pub server_key: PathBuf,
    /// Admin client certificate, `CN=gpuvm-e2e-admin, O=system:masters`.
    pub client_cert: PathBuf,
    /// Admin client key.
    pub client_key: PathBuf,
    /// Service-account signing key (private).
    pub sa_key: PathBuf,
    /// Service-account verification key (public).
    pub sa_pub: PathBuf,
    /// Static token file (`--token-auth-file`) with one admin token.
    pub tokens: PathBuf,
    /// The admin bearer token in `tokens`.
    pub admin_token: String,
}

const CA_CNF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
CN = gpuvm-e2e-ca
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
";

const SERVER_CNF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
CN = kube-apiserver
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1
";

const CLIENT_CNF: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
O = system:masters
CN = gpuvm-e2e-admin
[v3_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
";

/// Writes a fresh PKI into `dir` (which must exist). Each certificate lasts two days.
pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
    let p = |name: &str| dir.join(name);
    for (name, text) in [
        ("ca.cnf", CA_CNF),
        ("server.cnf", SERVER_CNF),
        ("client.cnf", CLIENT_CNF),
    ] {
        std::fs::write(p(name), text).with_context(|| format!("writing {name}"))?;
    }
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-sha256",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-config",
            "ca.cnf",
            "-extensions",
            "v3_ca",
        ],
    )?;
    for (who, serial) in [("server", "2"), ("client", "3")] {
        let key = format!("{who}.key");
        let csr = format!("{who}.csr");
        let crt = format!("{who}.crt");
        let cnf = format!("{who}.cnf");
        let ext = format!("v3_{who}");
        openssl(
            dir,
            &[
                "req", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-keyout", &key, "-out",
                &csr, "-config", &cnf,
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                serial,
                "-sha256",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &cnf,
                "-extensions",
                &ext,
            ],
        )?;
    }
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

    let admin_token = format!("gpuvm-e2e-{}", std::process::id());
    // token,user,uid,"group1,group2"
    std::fs::write(
        p("tokens.csv"),
        format!("{admin_token},gpuvm-e2e-admin,gpuvm-e2e-admin,\"system:masters\"\n"),
    )
    .context("writing tokens.csv")?;

    Ok(Pki {
        ca_cert: p("ca.crt"),
        ca_key: p("ca.key"),
        server_cert: p("server.crt"),
        server_key: p("server.key"),
        client_cert: p("client.crt"),
        client_key: p("client.key"),
        sa_key: p("sa.key"),
        sa_pub: p("sa.pub"),
        tokens: p("tokens.csv"),
        admin_token,
    })
}

/// Runs `openssl <args>` in `dir`, failing with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let bin = std::env::var_os("OPENSSL").unwrap_or_else(|| "openssl".into());
    let out = Command::new(&bin)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {} (is openssl installed?)", bin.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openssl_text(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn generates_a_consistent_pki() {
        if crate::assets::find_on_path("openssl").is_none() {
            // Without openssl no loopback control plane can start.
            gpuvm_testkit::skip(
                gpuvm_testkit::Requirement::ApiServer,
                "openssl is not installed",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pki = generate(dir.path()).unwrap();
        let ca = pki.ca_cert.to_str().unwrap();
        for cert in [&pki.server_cert, &pki.client_cert] {
            let out = openssl_text(&["verify", "-CAfile", ca, cert.to_str().unwrap()]);
            assert!(out.contains(": OK"), "{out}");
        }
        let server = openssl_text(&[
            "x509",
            "-in",
            pki.server_cert.to_str().unwrap(),
            "-noout",
            "-text",
        ]);
        assert!(server.contains("IP Address:127.0.0.1"), "{server}");
        assert!(server.contains("TLS Web Server Authentication"), "{server}");
        let client = openssl_text(&[
            "x509",
            "-in",
            pki.client_cert.to_str().unwrap(),
            "-noout",
            "-subject",
            "-ext",
            "extendedKeyUsage",
        ]);
        assert!(client.contains("O = system:masters"), "{client}");
        assert!(client.contains("CN = gpuvm-e2e-admin"), "{client}");
        assert!(client.contains("TLS Web Client Authentication"), "{client}");
        let sa = std::fs::read_to_string(&pki.sa_pub).unwrap();
        assert!(sa.starts_with("-----BEGIN PUBLIC KEY-----"), "{sa}");
        let tokens = std::fs::read_to_string(&pki.tokens).unwrap();
        assert!(tokens.starts_with(&pki.admin_token), "{tokens}");
    }
}
