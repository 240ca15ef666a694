//! Clients that act as a ServiceAccount, with a real token from the TokenRequest API:
//! the API server authenticates them exactly as it would the operator's or the node
//! agent's Pod, including the node name a token bound to a Pod carries
//! (`authentication.kubernetes.io/node-name`, Kubernetes >= 1.32).

use std::path::Path;

use anyhow::Context as _;
use http::header::{AUTHORIZATION, HeaderValue};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt as _};

/// Creates ServiceAccount `namespace/name` unless it exists.
pub async fn ensure_service_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating ServiceAccount {namespace}/{name}")),
    }
}

/// A token for ServiceAccount `namespace/name`, bound to `pod` when given (then it
/// carries the name of the node the Pod is on, and dies with the Pod).
pub async fn service_account_token(
    admin: &Client,
    namespace: &str,
    name: &str,
    pod: Option<&Pod>,
) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        metadata: ObjectMeta::default(),
        spec: TokenRequestSpec {
            // Empty: the API server's own audience.
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
        },
        status: None,
    };
    let answer = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
    answer
        .status
        .map(|s| s.token)
        .with_context(|| format!("the token request for {namespace}/{name} has no status"))
}

/// A client for the cluster of the kubeconfig at `admin_kubeconfig` (its server and CA)
/// that authenticates with `token` only.
pub async fn token_client(admin_kubeconfig: &Path, token: &str) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(admin_kubeconfig)
        .with_context(|| format!("reading {}", admin_kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .context("loading the admin kubeconfig")?;
    // Drop the admin's client certificate: the token is the only identity.
    config.auth_info = AuthInfo::default();
    config.headers.push((
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).context("a token header")?,
    ));
    Client::try_from(config).context("building a token client")
}

/// Writes a kubeconfig to `out` for the cluster of `admin_kubeconfig` (its server and
/// CA) that authenticates with `token` only, for a child process (the node agent).
pub fn write_token_kubeconfig(
    admin_kubeconfig: &Path,
    token: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let kubeconfig = Kubeconfig::read_from(admin_kubeconfig)
        .with_context(|| format!("reading {}", admin_kubeconfig.display()))?;
    let cluster = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("the admin kubeconfig names no cluster")?;
    let server = cluster
        .server
        .context("the admin kubeconfig names no server")?;
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let ca = match (
        cluster.certificate_authority,
        cluster.certificate_authority_data,
    ) {
        (Some(path), _) => format!("certificate-authority: {}", quote(&path)),
        (None, Some(data)) => format!("certificate-authority-data: {}", quote(&data)),
        (None, None) => "insecure-skip-tls-verify: false".to_owned(),
    };
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: {server}
    {ca}
users:
- name: token
  user:
    token: {token}
contexts:
- name: token
  context:
    cluster: cluster
    user: token
current-context: token
",
        server = quote(&server),
        token = quote(token),
    );
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))
}
