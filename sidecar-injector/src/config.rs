//! The injector's config, in the shape of Istio 1.1's
//! `istio-sidecar-injector` ConfigMap: the default `policy`, label
//! selectors that override it, and the `template` that renders the
//! sidecar. The template is Jinja (`minijinja`), not Go's text/template;
//! it sees the pod, its namespace, the config's `values`, and the helpers
//! in [`crate::inject`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube_core::Selector;
use serde::Deserialize;

/// The default config, which the manifests ship as the injector's ConfigMap.
pub const DEFAULT: &str = include_str!("../../manifests/injector-config.yaml");

/// Whether pods that say nothing are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Enabled,
    Disabled,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Raw {
    policy: Policy,
    #[serde(default)]
    always_inject_selector: Vec<LabelSelector>,
    #[serde(default)]
    never_inject_selector: Vec<LabelSelector>,
    /// Annotations added to every injected pod.
    #[serde(default)]
    injected_annotations: BTreeMap<String, String>,
    #[serde(default)]
    values: serde_json::Value,
    template: String,
}

/// A parsed config whose template compiles.
pub struct Config {
    pub policy: Policy,
    pub always: Vec<Selector>,
    pub never: Vec<Selector>,
    pub injected_annotations: BTreeMap<String, String>,
    pub values: serde_json::Value,
    pub template: String,
    /// A digest of the whole config, recorded on every pod it injects.
    pub version: String,
}

impl Config {
    /// Parses `text` (read from `origin`, for messages); any problem, the
    /// template's included, is an error naming where it is.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Self> {
        let raw: Raw =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let selectors = |list: Vec<LabelSelector>, field: &str| {
            list.into_iter()
                .enumerate()
                .map(|(i, s)| {
                    Selector::try_from(s)
                        .map_err(|e| anyhow::anyhow!("{origin}: {field}[{i}]: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        };
        let config = Self {
            policy: raw.policy,
            always: selectors(raw.always_inject_selector, "alwaysInjectSelector")?,
            never: selectors(raw.never_inject_selector, "neverInjectSelector")?,
            injected_annotations: raw.injected_annotations,
            values: raw.values,
            template: raw.template,
            version: digest(text),
        };
        crate::inject::environment(&config.template)
            .map_err(|e| anyhow::anyhow!("{origin}: template: {e:#}"))?;
        Ok(config)
    }
}

/// Hex SHA-256 of `text`.
fn digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_parses() {
        let config = Config::parse(DEFAULT, "default").unwrap();
        assert_eq!(config.policy, Policy::Enabled);
        assert_eq!(config.version.len(), 64);
    }

    #[test]
    fn problems_name_where_they_are() {
        let bad_template = "policy: enabled\ntemplate: '{% if %}'\n";
        let e = Config::parse(bad_template, "cfg.yaml").err().unwrap();
        assert!(e.to_string().starts_with("cfg.yaml: template:"), "{e}");
        let bad_policy = "policy: sometimes\ntemplate: ''\n";
        let e = Config::parse(bad_policy, "cfg.yaml").err().unwrap();
        assert!(e.to_string().contains("sometimes"), "{e}");
        let bad_selector = "policy: enabled\ntemplate: ''\nneverInjectSelector:\n- matchExpressions: [{key: a, operator: Near}]\n";
        let e = Config::parse(bad_selector, "cfg.yaml").err().unwrap();
        assert!(
            e.to_string()
                .starts_with("cfg.yaml: neverInjectSelector[0]:"),
            "{e}"
        );
    }
}
