//! Chart templates applied as they are: the admission tests send the API server the very
//! files in `charts/gpuvm/templates/`, so the test and the chart cannot drift apart.
//!
//! There is no Helm here (the chart tests render with helm-sdkpy in Python, which a
//! fresh clone has only after `charts/tests/run.sh`). The templates these tests apply
//! use a handful of Helm expressions; [`render_template`] substitutes exactly those, as
//! Helm renders them for release `gpuvm` in namespace `gpuvm-system` with the default
//! values, and refuses a template that uses any other expression, so a new expression
//! fails the test instead of being sent as text. `charts/tests/test_render.py`
//! (`test_admission_templates_render_as_the_e2e_tests_apply_them`) renders the same
//! files with Helm and checks the results are equal.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use serde_json::Value;

/// The release namespace the substitutions assume.
pub const RELEASE_NAMESPACE: &str = "gpuvm-system";
/// The operator's ServiceAccount in that release.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "gpuvm-operator";
/// The node agent's ServiceAccount in that release.
pub const NODE_SERVICE_ACCOUNT: &str = "gpuvm-node";

/// The Helm expressions (between `{{` and `}}`, trim markers removed) the applied
/// templates may use, and what Helm makes of each for release `gpuvm` in
/// [`RELEASE_NAMESPACE`] with the default values.
pub fn substitutions() -> Vec<(&'static str, String)> {
    let operator = format!("system:serviceaccount:{RELEASE_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}");
    let node = format!("system:serviceaccount:{RELEASE_NAMESPACE}:{NODE_SERVICE_ACCOUNT}");
    vec![
        (r#"include "gpuvm.fullname" ."#, "gpuvm".to_owned()),
        (
            r#"include "gpuvm.node.name" ."#,
            NODE_SERVICE_ACCOUNT.to_owned(),
        ),
        (
            r#"include "gpuvm.operator.name" ."#,
            OPERATOR_SERVICE_ACCOUNT.to_owned(),
        ),
        (".Release.Namespace", RELEASE_NAMESPACE.to_owned()),
        // Only the label every object of the chart carries that says whose it is.
        (
            r#"include "gpuvm.labels" . | nindent 4"#,
            "\n    app.kubernetes.io/part-of: gpuvm".to_owned(),
        ),
        (
            r#"include "gpuvm.operator.username" . | squote"#,
            format!("'{operator}'"),
        ),
        (
            r#"include "gpuvm.operator.username" . | squote | quote"#,
            format!("\"'{operator}'\""),
        ),
        (
            r#"include "gpuvm.node.username" . | squote"#,
            format!("'{node}'"),
        ),
        (
            r#"include "gpuvm.node.username" . | squote | quote"#,
            format!("\"'{node}'\""),
        ),
    ]
}

/// `charts/gpuvm/templates/<name>` in this checkout.
pub fn template_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/gpuvm/templates")
        .join(name)
}

/// Renders a template with [`substitutions`]; an expression not in that list is an error
/// naming it. Helm's whitespace trimming (`{{-`, `-}}`) and comments (`{{/* */}}`) are
/// honoured.
pub fn render_str(text: &str) -> anyhow::Result<String> {
    let table = substitutions();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("a '{{{{' without '}}}}'");
        };
        let mut inner = &after[..end];
        rest = &after[end + 2..];
        if let Some(trimmed) = inner.strip_prefix('-') {
            inner = trimmed;
            out.truncate(out.trim_end().len());
        }
        if let Some(trimmed) = inner.strip_suffix('-') {
            inner = trimmed;
            rest = rest.trim_start();
        }
        let inner = inner.trim();
        if inner.starts_with("/*") && inner.ends_with("*/") {
            continue;
        }
        match table.iter().find(|(expr, _)| *expr == inner) {
            Some((_, value)) => out.push_str(value),
            None => bail!(
                "the template uses `{{{{ {inner} }}}}`, which the e2e rendering does not know: \
                 add it to gpuvm_e2e::chart::substitutions (and to the chart test that checks \
                 them against Helm)"
            ),
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The objects of `charts/gpuvm/templates/<name>`, rendered by [`render_str`].
pub fn template_objects(name: &str) -> anyhow::Result<Vec<Value>> {
    let path = template_path(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rendered = render_str(&text).with_context(|| format!("rendering {}", path.display()))?;
    let docs: Vec<Option<Value>> = serde_saphyr::from_multiple(&rendered)
        .with_context(|| format!("parsing the rendered {}", path.display()))?;
    Ok(docs
        .into_iter()
        .flatten()
        .filter(|v| !v.is_null())
        .collect())
}

/// Applies objects by server-side apply (field manager `gpuvm-e2e`), namespaced ones in
/// the namespace they name or else [`RELEASE_NAMESPACE`].
pub async fn apply_objects(client: &Client, objects: &[Value]) -> anyhow::Result<()> {
    for object in objects {
        let obj: DynamicObject =
            serde_json::from_value(object.clone()).context("reading a rendered object")?;
        let types = obj
            .types
            .clone()
            .context("a rendered object without apiVersion/kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let name = obj
            .metadata
            .name
            .clone()
            .context("an object without a name")?;
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {}", types.kind))?;
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let namespace = obj
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(RELEASE_NAMESPACE);
                Api::namespaced_with(client.clone(), namespace, &resource)
            }
        };
        api.patch(
            &name,
            &PatchParams::apply("gpuvm-e2e").force(),
            &Patch::Apply(object),
        )
        .await
        .with_context(|| format!("applying {} {name}", types.kind))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_expressions_are_substituted_with_helm_trimming() {
        let text = "metadata:\n  name: {{ include \"gpuvm.fullname\" . }}-pods\n  labels:\n    \
                    {{- include \"gpuvm.labels\" . | nindent 4 }}\n{{- /* gone */}}\nns: {{ .Release.Namespace }}\n";
        assert_eq!(
            render_str(text).unwrap(),
            "metadata:\n  name: gpuvm-pods\n  labels:\n    app.kubernetes.io/part-of: gpuvm\nns: gpuvm-system\n"
        );
    }

    #[test]
    fn an_unknown_expression_is_refused_by_name() {
        let err = render_str("x: {{ .Values.something }}").unwrap_err();
        assert!(err.to_string().contains(".Values.something"), "{err}");
        assert!(render_str("x: {{ unclosed").is_err());
    }

    #[test]
    fn the_admission_and_node_rbac_templates_render() {
        let policies = template_objects("admission.yaml").unwrap();
        let kinds: Vec<&str> = policies.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ]
        );
        let rbac = template_objects("node-rbac.yaml").unwrap();
        assert!(
            rbac.iter()
                .any(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "gpuvm-node")
        );
    }
}
