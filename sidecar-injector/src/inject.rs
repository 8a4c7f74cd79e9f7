//! Injection: whether a pod gets the sidecar (Istio 1.1's rules), the
//! template rendered for it, and the JSON Patch that adds the result. The
//! webhook and `meshctl kube-inject` both go through [`Injector::inject`],
//! so a pod comes out the same either way.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use kube_core::SelectorExt;
use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{Config, Policy};

/// The pod annotation that asks for (or refuses) injection.
pub const INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";
/// The annotation recording what injection added.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Namespaces whose pods are never injected.
const IGNORED_NAMESPACES: &[&str] = &["kube-system", "kube-public"];

const TEMPLATE: &str = "sidecar";

/// What the injector did with a pod.
#[derive(Debug)]
pub enum Outcome {
    /// The patch that injects it.
    Injected(Patch),
    /// Left alone, and why.
    Skipped(&'static str),
}

/// A template environment holding `template`, strict about undefined
/// values so that a misspelt name is an error rather than an empty string.
pub fn environment(template: &str) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.add_template_owned(TEMPLATE, template.to_string())?;
    Ok(env)
}

/// What the template renders: Istio's `SidecarInjectionSpec`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    init_containers: Vec<Value>,
    #[serde(default)]
    containers: Vec<Value>,
    #[serde(default)]
    volumes: Vec<Value>,
    #[serde(default)]
    image_pull_secrets: Vec<Value>,
}

pub struct Injector {
    config: Config,
    env: Environment<'static>,
}

impl Injector {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let env = environment(&config.template)?;
        Ok(Self { config, env })
    }

    /// The digest of the config in force.
    pub fn version(&self) -> &str {
        &self.config.version
    }

    /// Injects `pod` (a Pod's JSON, or a pod template's), which runs in
    /// `namespace`. An error names what went wrong; the pod is untouched.
    pub fn inject(&self, pod: &Value, namespace: &str) -> anyhow::Result<Outcome> {
        if let Some(reason) = self.skip_reason(pod, namespace) {
            return Ok(Outcome::Skipped(reason));
        }
        // A patch must apply to the pod as it is: refused, never a patch
        // that the API server cannot apply.
        anyhow::ensure!(
            pod["spec"].is_object(),
            "the pod has no spec to add the proxy to (spec: {})",
            pod["spec"]
        );
        let spec = self.render(pod, namespace)?;
        Ok(Outcome::Injected(self.patch(pod, spec)?))
    }

    /// Istio 1.1's rules, in order: host-network pods and system
    /// namespaces never; an injected pod not again; then the pod's
    /// annotation, then the never and always selectors, then the policy.
    fn skip_reason(&self, pod: &Value, namespace: &str) -> Option<&'static str> {
        if pod["spec"]["hostNetwork"] == json!(true) {
            return Some("the pod uses the host's network");
        }
        if IGNORED_NAMESPACES.contains(&namespace) {
            return Some("the namespace is a system one");
        }
        let annotations = &pod["metadata"]["annotations"];
        if annotations.get(STATUS_ANNOTATION).is_some() {
            return Some("the pod is injected already");
        }
        let asked = annotations[INJECT_ANNOTATION]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match asked.as_str() {
            "y" | "yes" | "true" | "on" => return None,
            "" => {}
            _ => return Some("the pod's annotation refuses injection"),
        }
        let labels: BTreeMap<String, String> =
            serde_json::from_value(pod["metadata"]["labels"].clone()).unwrap_or_default();
        if self.config.never.iter().any(|s| s.matches(&labels)) {
            return Some("the pod matches neverInjectSelector");
        }
        if self.config.always.iter().any(|s| s.matches(&labels)) {
            return None;
        }
        match self.config.policy {
            Policy::Enabled => None,
            Policy::Disabled => Some("the policy is disabled and the pod does not ask"),
        }
    }

    fn render(&self, pod: &Value, namespace: &str) -> anyhow::Result<Spec> {
        let annotations = match &pod["metadata"]["annotations"] {
            Value::Object(map) => Value::Object(map.clone()),
            _ => json!({}),
        };
        let labels = match &pod["metadata"]["labels"] {
            Value::Object(map) => map
                .iter()
                .filter_map(|(k, v)| Some(format!("{k}={}", v.as_str()?)))
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        let context = minijinja::context! {
            pod => pod,
            namespace => namespace,
            values => &self.config.values,
            annotations => annotations,
            labels => labels,
            container_ports => container_ports(pod),
        };
        let text = self
            .env
            .get_template(TEMPLATE)
            .and_then(|t| t.render(context))
            .map_err(|e| anyhow::anyhow!("the injection template failed: {e:#}"))?;
        serde_saphyr::from_str::<Option<Spec>>(&text)
            .map(Option::unwrap_or_default)
            .map_err(|e| anyhow::anyhow!("the injection template rendered bad YAML: {e}"))
    }

    fn patch(&self, pod: &Value, spec: Spec) -> anyhow::Result<Patch> {
        let names = |items: &[Value]| -> Vec<String> {
            items
                .iter()
                .filter_map(|i| i["name"].as_str().map(str::to_string))
                .collect()
        };
        let status = json!({
            "version": self.config.version,
            "initContainers": names(&spec.init_containers),
            "containers": names(&spec.containers),
            "volumes": names(&spec.volumes),
            "imagePullSecrets": names(&spec.image_pull_secrets),
        });
        let mut ops = Vec::new();
        for (field, items) in [
            ("initContainers", spec.init_containers),
            ("containers", spec.containers),
            ("volumes", spec.volumes),
            ("imagePullSecrets", spec.image_pull_secrets),
        ] {
            append(&mut ops, pod, field, items)?;
        }
        let mut annotations = self.config.injected_annotations.clone();
        annotations.insert(STATUS_ANNOTATION.into(), status.to_string());
        match (&pod["metadata"], &pod["metadata"]["annotations"]) {
            (_, Value::Object(_)) => {
                for (k, v) in annotations {
                    ops.push(add(&["metadata", "annotations", &k], Value::String(v)));
                }
            }
            (Value::Object(_), _) => {
                ops.push(add(&["metadata", "annotations"], json!(annotations)))
            }
            // A pod template may have no metadata at all.
            _ => ops.push(add(&["metadata"], json!({ "annotations": annotations }))),
        }
        Ok(Patch(ops))
    }
}

/// Adds `items` to the pod spec's list `field`, refusing a name the pod
/// already has (Kubernetes would refuse the pod).
fn append(
    ops: &mut Vec<PatchOperation>,
    pod: &Value,
    field: &str,
    items: Vec<Value>,
) -> anyhow::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let existing = match &pod["spec"][field] {
        Value::Array(existing) => existing,
        Value::Null => {
            ops.push(add(&["spec", field], Value::Array(items)));
            return Ok(());
        }
        other => anyhow::bail!("the pod's spec.{field} is not a list: {other}"),
    };
    for item in items {
        if let Some(name) = item["name"].as_str()
            && existing.iter().any(|e| e["name"].as_str() == Some(name))
        {
            anyhow::bail!("the pod already has {field} entry {name:?}");
        }
        ops.push(add(&["spec", field, "-"], item));
    }
    Ok(())
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

/// The TCP ports the pod's containers declare, comma-separated: the
/// inbound ports redirected unless the pod's annotation says otherwise.
fn container_ports(pod: &Value) -> String {
    let mut ports: Vec<u64> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter(|p| p["protocol"].as_str().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT;

    /// The default config with `line` in place of the one it starts as.
    fn injector(line: &str) -> Injector {
        let key = line.split(':').next().unwrap();
        let text = DEFAULT
            .lines()
            .map(|l| if l.starts_with(key) { line } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        Injector::new(Config::parse(&text, "test").unwrap()).unwrap()
    }

    fn pod(labels: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "reviews-1", "labels": labels, "annotations": annotations},
            "spec": {
                "serviceAccountName": "reviews",
                "containers": [{"name": "app", "image": "reviews", "ports": [
                    {"containerPort": 9080},
                    {"containerPort": 9090, "protocol": "UDP"},
                    {"containerPort": 8080, "protocol": "TCP"},
                ]}],
            },
        })
    }

    fn injected(injector: &Injector, pod: &Value, ns: &str) -> Value {
        let Outcome::Injected(patch) = injector.inject(pod, ns).unwrap() else {
            panic!("not injected")
        };
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    mod fuzz {
        use proptest::prelude::*;
        use serde_json::Value;
        use testkit::fuzz;

        use super::injector;
        use crate::inject::Outcome;

        /// The words a pod and the injector's annotations are made of.
        const KEYS: &[&str] = &[
            "metadata",
            "labels",
            "annotations",
            "name",
            "namespace",
            "spec",
            "containers",
            "initContainers",
            "ports",
            "containerPort",
            "protocol",
            "image",
            "volumes",
            "hostNetwork",
            "serviceAccountName",
            "status",
            "sidecar.istio.io/inject",
            "sidecar.istio.io/status",
            "traffic.sidecar.istio.io/includeInboundPorts",
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "status.sidecar.istio.io/port",
            "readiness.status.sidecar.istio.io/initialDelaySeconds",
            "inject.istio.io/templates",
            "app",
            "version",
            "~",
            "/",
        ];

        /// Values of those annotations and fields.
        const STRINGS: &[&str] = &[
            "true",
            "false",
            "9080",
            "*",
            "10.0.0.0/8",
            "-1",
            "a,
            b",
            "",
        ];

        fn json() -> impl Strategy<Value = Value> {
            fuzz::json(KEYS, STRINGS)
        }

        proptest! {
            /// Whatever a pod holds, the injector answers, and the patch it
            /// returns applies to that pod.
            #[test]
            fn any_pod_is_answered_with_a_patch_that_applies(pod in json(), namespace in any::<String>()) {
                let injector = injector("policy: enabled");
                if let Ok(Outcome::Injected(patch)) = injector.inject(&pod, &namespace) {
                    let mut out = pod.clone();
                    prop_assert!(json_patch::patch(&mut out, &patch).is_ok(), "{pod}: {patch:?}");
                }
            }
        }
    }

    /// Found by fuzzing: a pod whose spec is not an object got a patch the
    /// API server could not apply.
    #[test]
    fn a_pod_without_a_spec_or_with_a_list_that_is_not_one_is_refused() {
        let i = injector("policy: enabled");
        let no_spec = json!({"spec": null});
        let e = i.inject(&no_spec, "shop").err().unwrap().to_string();
        assert!(e.contains("no spec"), "{e}");
        let mut odd = pod(json!({}), json!({}));
        odd["spec"]["volumes"] = json!("not a list");
        let e = i.inject(&odd, "shop").err().unwrap().to_string();
        assert!(e.contains("spec.volumes is not a list"), "{e}");
    }

    #[test]
    fn a_pod_gets_the_proxy_and_the_init_container() {
        let i = injector("policy: enabled");
        let out = injected(&i, &pod(json!({"app": "reviews"}), json!({})), "shop");
        let names = |field: &str| -> Vec<&str> {
            out["spec"][field]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect()
        };
        assert_eq!(names("containers"), ["app", "istio-proxy"]);
        assert_eq!(names("initContainers"), ["istio-init"]);
        let init_args = out["spec"]["initContainers"][0]["args"].to_string();
        assert!(
            init_args.contains("--inbound-ports=8080,9080"),
            "{init_args}"
        );
        let proxy_args = out["spec"]["containers"][1]["args"].to_string();
        assert!(proxy_args.contains("--labels=app=reviews"), "{proxy_args}");
        let status: Value = serde_json::from_str(
            out["metadata"]["annotations"][STATUS_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(status["containers"], json!(["istio-proxy"]));
        assert_eq!(status["version"], json!(i.version()));
    }

    #[test]
    fn pods_are_left_alone_when_the_rules_say_so() {
        let i = injector("neverInjectSelector: [{matchLabels: {batch: 'true'}}]");
        let skipped =
            |pod: Value, ns: &str| matches!(i.inject(&pod, ns).unwrap(), Outcome::Skipped(_));
        assert!(skipped(
            pod(json!({}), json!({INJECT_ANNOTATION: "false"})),
            "shop"
        ));
        assert!(skipped(
            pod(json!({}), json!({STATUS_ANNOTATION: "{}"})),
            "shop"
        ));
        assert!(skipped(pod(json!({"batch": "true"}), json!({})), "shop"));
        assert!(skipped(pod(json!({}), json!({})), "kube-system"));
        let mut host = pod(json!({}), json!({}));
        host["spec"]["hostNetwork"] = json!(true);
        assert!(skipped(host, "shop"));
        // The pod's own yes wins over the never selector.
        let asked = pod(json!({"batch": "true"}), json!({INJECT_ANNOTATION: "yes"}));
        assert!(!skipped(asked, "shop"));
    }

    #[test]
    fn a_disabled_policy_injects_only_pods_that_ask_or_match_always() {
        let text = DEFAULT
            .replacen("policy: enabled", "policy: disabled", 1)
            .replacen(
                "alwaysInjectSelector: []",
                "alwaysInjectSelector: [{matchLabels: {mesh: 'on'}}]",
                1,
            );
        let i = Injector::new(Config::parse(&text, "test").unwrap()).unwrap();
        let injects = |pod: Value| matches!(i.inject(&pod, "shop").unwrap(), Outcome::Injected(_));
        assert!(!injects(pod(json!({}), json!({}))));
        assert!(injects(pod(json!({}), json!({INJECT_ANNOTATION: "true"}))));
        assert!(injects(pod(json!({"mesh": "on"}), json!({}))));
    }

    #[test]
    fn a_name_the_pod_has_already_is_an_error_not_a_broken_pod() {
        let i = injector("policy: enabled");
        let mut p = pod(json!({}), json!({}));
        p["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "istio-proxy"}));
        let e = i.inject(&p, "shop").unwrap_err();
        assert!(e.to_string().contains("\"istio-proxy\""), "{e}");
    }

    #[test]
    fn a_template_that_fails_for_a_pod_says_why() {
        let text =
            "policy: enabled\ntemplate: 'containers: [{name: {{ pod.spec.nothing.here }}}]'\n";
        let i = Injector::new(Config::parse(text, "test").unwrap()).unwrap();
        let e = i.inject(&pod(json!({}), json!({})), "shop").unwrap_err();
        assert!(
            e.to_string().starts_with("the injection template failed"),
            "{e}"
        );
    }
}
