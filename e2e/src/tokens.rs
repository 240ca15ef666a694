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
