//! The kubeconfig file for a loopback control plane: client-certificate auth as a member
//! of `system:masters`.

use std::path::Path;

/// Renders a kubeconfig for `server` (e.g. `https://127.0.0.1:6443`) trusting the CA in
/// `ca` and authenticating with the client certificate `cert` and key `key`. Paths are
/// written as JSON strings, which YAML reads verbatim whatever characters they hold.
pub fn render(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let path = |p: &Path| quote(&p.to_string_lossy());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: gpuvm-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: gpuvm-e2e-admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: gpuvm-e2e
  context:
    cluster: gpuvm-e2e
    user: gpuvm-e2e-admin
    namespace: default
current-context: gpuvm-e2e
preferences: {{}}
",
        server = quote(server),
        ca = path(ca),
        cert = path(cert),
        key = path(key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::config::Kubeconfig;

    #[test]
    fn renders_a_kubeconfig_kube_can_read() {
        let text = render(
            "https://127.0.0.1:40123",
            Path::new("/tmp/e2e dir/ca.crt"),
            Path::new("/tmp/e2e dir/client.crt"),
            Path::new("/tmp/e2e: \"dir\"/client.key"),
        );
        let kc = Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("gpuvm-e2e"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:40123"));
        assert_eq!(
            cluster.certificate_authority.as_deref(),
            Some("/tmp/e2e dir/ca.crt")
        );
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            user.client_certificate.as_deref(),
            Some("/tmp/e2e dir/client.crt")
        );
        assert_eq!(
            user.client_key.as_deref(),
            Some("/tmp/e2e: \"dir\"/client.key")
        );
        let ctx = kc.contexts[0].context.as_ref().unwrap();
        assert_eq!(
            (ctx.cluster.as_str(), ctx.user.as_deref()),
            ("gpuvm-e2e", Some("gpuvm-e2e-admin"))
        );
    }
}
