//! `manifests/`, checked offline: every object (the ConfigMaps the
//! kustomization generates, and a pod as the injector leaves it, included)
//! validates against Kubernetes' OpenAPI schemas (`kubernetes-validate`
//! from PyPI, installed when missing); the CRDs are exactly the kinds
//! Galley watches; and every Deployment runs a binary of this workspace
//! with flags it accepts, on the ports, probes and files it declares.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use mesh_api::kinds::KINDS;
use serde_json::{Value, json};
use testkit::{run_ok, strings};

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn kustomization() -> Value {
    let text = std::fs::read_to_string(manifests().join("kustomization.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Every object `kubectl apply -k manifests/` creates, as kustomize
/// would build it (namespace set, ConfigMaps generated), with its file.
fn objects() -> Vec<(String, Value)> {
    let k = kustomization();
    let namespace = k["namespace"].as_str().unwrap();
    let mut out = Vec::new();
    for file in k["resources"].as_array().unwrap() {
        let file = file.as_str().unwrap();
        let text = std::fs::read_to_string(manifests().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for mut doc in yaml_docs(&text) {
            let cluster_scoped = [
                "Namespace",
                "CustomResourceDefinition",
                "ClusterRole",
                "ClusterRoleBinding",
                "MutatingWebhookConfiguration",
                "ValidatingWebhookConfiguration",
            ];
            if !cluster_scoped.contains(&doc["kind"].as_str().unwrap()) {
                doc["metadata"]["namespace"] = json!(namespace);
            }
            out.push((file.to_string(), doc));
        }
    }
    for generator in k["configMapGenerator"].as_array().unwrap() {
        let mut data = BTreeMap::new();
        for entry in generator["files"].as_array().unwrap() {
            let (key, file) = entry.as_str().unwrap().split_once('=').unwrap();
            let text = std::fs::read_to_string(manifests().join(file)).unwrap();
            data.insert(key.to_string(), text);
        }
        let config_map = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "namespace": namespace},
            "data": data,
        });
        out.push(("kustomization.yaml".into(), config_map));
    }
    out
}

fn of_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == kind)
        .collect()
}

/// The CRDs of every Istio kind Galley watches in Kubernetes: a
/// structural schema that keeps `spec` whole, since Galley's validating
/// webhook (and Galley again when it reads them) judges the fields.
fn crds() -> String {
    let mut docs = vec![
        "# Generated from mesh_api::kinds::KINDS by e2e/tests/manifests.rs; to change it,\n\
         # run UPDATE_MANIFESTS=1 cargo test -p e2e --test manifests.\n"
            .to_string(),
    ];
    for kind in KINDS.iter().filter(|k| !k.api_version.is_empty()) {
        let (group, version) = kind.group_version();
        let plural = kind.plural();
        let category = group.replace('.', "-");
        docs.push(format!(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.{group}
  labels: {{app: istio, istio: core}}
spec:
  group: {group}
  scope: {scope}
  names:
    kind: {kind}
    listKind: {kind}List
    plural: {plural}
    singular: {singular}
    categories: [istio-io, {category}]
  versions:
    - name: {version}
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              x-kubernetes-preserve-unknown-fields: true
",
            scope = if kind.namespaced {
                "Namespaced"
            } else {
                "Cluster"
            },
            kind = kind.kind,
            singular = kind.kind.to_lowercase(),
        ));
    }
    docs.join("---\n")
}

#[test]
fn the_crds_are_the_kinds_galley_watches() {
    let path = manifests().join("crds.yaml");
    let expected = crds();
    if std::env::var_os("UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "manifests/crds.yaml is stale: UPDATE_MANIFESTS=1 cargo test -p e2e --test manifests"
    );
}

/// `kubernetes-validate`, installed from PyPI when missing.
fn kubernetes_validate() -> Command {
    let installed = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "kubernetes-validate"])
            .status()
            .expect("python3 runs");
        assert!(status.success(), "pip install kubernetes-validate failed");
    }
    let mut command = Command::new("python3");
    command.args(["-m", "kubernetes_validate", "--strict", "-k", "1.34.0"]);
    command
}

/// A pod as the injector leaves it, from the default config.
fn injected_pod() -> Value {
    let config = sidecar_injector::config::Config::parse(
        sidecar_injector::config::DEFAULT,
        "manifests/injector-config.yaml",
    )
    .unwrap();
    let injector = sidecar_injector::inject::Injector::new(config).unwrap();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reviews-v1", "namespace": "shop", "labels": {"app": "reviews", "version": "v1"}},
        "spec": {"serviceAccountName": "reviews", "containers": [
            {"name": "reviews", "image": "reviews:1", "ports": [{"containerPort": 9080}]}
        ]},
    });
    let sidecar_injector::inject::Outcome::Injected(patch) = injector.inject(&pod, "shop").unwrap()
    else {
        panic!("not injected");
    };
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[test]
fn every_object_validates_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut objects = objects();
    objects.push(("the injector's output".into(), injected_pod()));
    for (i, (from, object)) in objects.iter().enumerate() {
        let path = dir.path().join(format!(
            "{i:02}-{}-{}.json",
            from.replace(['/', ' ', '\''], "_"),
            object["metadata"]["name"].as_str().unwrap()
        ));
        std::fs::write(&path, object.to_string()).unwrap();
        files.push(path);
    }
    let out = kubernetes_validate().args(&files).output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(
        !report.contains("ERROR") && !report.contains("WARN"),
        "{report}"
    );
}

/// The port of an address flag's value (`--x-addr=0.0.0.0:9901`).
fn flag_port(arg: &str) -> Option<(String, u16)> {
    let (flag, value) = arg.split_once('=')?;
    if !flag.ends_with("-addr") {
        return None;
    }
    let port = value.rsplit_once(':')?.1.parse().ok()?;
    Some((flag.to_string(), port))
}

#[test]
fn every_deployment_runs_a_workspace_binary_with_flags_it_accepts() {
    let objects = objects();
    let accounts: BTreeSet<&str> = of_kind(&objects, "ServiceAccount")
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap())
        .collect();
    let deployments = of_kind(&objects, "Deployment");
    assert_eq!(
        deployments.len(),
        8,
        "galley, pilot, citadel, policy, telemetry, injector, ingress and egress gateways"
    );
    let version = env!("CARGO_PKG_VERSION");
    for deployment in &deployments {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"];
        let account = pod["spec"]["serviceAccountName"].as_str().unwrap();
        assert!(
            accounts.contains(account),
            "{name}: no ServiceAccount {account}"
        );
        let labels = &pod["metadata"]["labels"];
        let selects = |selector: &Value| {
            selector
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| &labels[k] == v)
        };
        assert!(
            selects(&deployment["spec"]["selector"]["matchLabels"]),
            "{name}"
        );
        let budgets = of_kind(&objects, "PodDisruptionBudget");
        assert!(
            budgets
                .iter()
                .any(|b| selects(&b["spec"]["selector"]["matchLabels"])),
            "{name}: no PodDisruptionBudget"
        );

        for container in pod["spec"]["containers"].as_array().unwrap() {
            // The image is this workspace's binary, at this version, and
            // a Dockerfile builds it.
            let image = container["image"].as_str().unwrap();
            let binary = image
                .strip_prefix("ghcr.io/mesh-rs/")
                .and_then(|i| i.strip_suffix(&format!(":{version}")))
                .unwrap_or_else(|| panic!("{name}: image {image}"));
            let dockerfile =
                std::fs::read_to_string(manifests().join(format!("../{binary}/Dockerfile")))
                    .unwrap_or_else(|e| panic!("{binary}/Dockerfile: {e}"));
            assert!(
                dockerfile.contains(&format!("--bin {binary}")),
                "{binary}/Dockerfile"
            );
            assert!(
                dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")),
                "{binary}/Dockerfile"
            );

            // Its flags parse.
            let args = strings(&container["args"]);
            run_ok(binary, &[&args[..], &["--help"]].concat());

            // The ports it listens on are the ports it declares.
            let listens: BTreeMap<String, u16> = args.iter().filter_map(|a| flag_port(a)).collect();
            let declared: BTreeMap<&str, u16> = container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap(),
                        p["containerPort"].as_u64().unwrap() as u16,
                    )
                })
                .collect();
            let listening: BTreeSet<u16> = listens.values().copied().collect();
            let open: BTreeSet<u16> = declared.values().copied().collect();
            if args.contains(&"--type=router") {
                // A gateway also listens where its Gateways say.
                assert!(listening.is_subset(&open), "{name}: ports");
            } else {
                assert_eq!(listening, open, "{name}: ports");
            }

            // Probes ask the admin port for what it serves.
            let admin = listens["--admin-addr"];
            for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{name}: {probe}");
                assert_eq!(get["port"], admin, "{name}: {probe}");
            }

            // Files it reads are where volumes are mounted.
            let mounts: Vec<&str> = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["mountPath"].as_str().unwrap())
                .collect();
            for arg in &args {
                let Some((flag, value)) = arg.split_once('=') else {
                    continue;
                };
                if value.starts_with('/') {
                    assert!(
                        mounts.iter().any(|m| value.starts_with(&format!("{m}/"))),
                        "{name}: {flag}={value} is on no volume"
                    );
                }
            }

            // Locked down.
            let security = &container["securityContext"];
            assert_eq!(security["runAsNonRoot"], true, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert!(container["resources"]["requests"].is_object(), "{name}");

            // Services reach it by port name.
            for service in of_kind(&objects, "Service") {
                if !service["spec"]["selector"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &labels[k] == v)
                {
                    continue;
                }
                for port in service["spec"]["ports"].as_array().unwrap() {
                    let target = port["targetPort"].as_str().unwrap();
                    assert!(
                        declared.contains_key(target),
                        "{name}: Service port {target}"
                    );
                    let port_name = port["name"].as_str().unwrap();
                    assert!(
                        ["grpc-", "http-", "https-", "tcp-", "tls"]
                            .iter()
                            .any(|p| port_name.starts_with(p)),
                        "{name}: Service port name {port_name} says no protocol"
                    );
                }
            }
        }
    }
    // Pilot, the Mixer pair and the gateways scale with load.
    let scaled: BTreeSet<&str> = of_kind(&objects, "HorizontalPodAutoscaler")
        .iter()
        .map(|h| h["spec"]["scaleTargetRef"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        scaled,
        BTreeSet::from([
            "istio-pilot",
            "istio-policy",
            "istio-telemetry",
            "istio-ingressgateway",
            "istio-egressgateway"
        ])
    );
}

#[test]
fn the_config_files_parse_as_their_components_read_them() {
    let mesh = mesh_api::mesh::load(&manifests().join("mesh.yaml")).unwrap();
    assert_eq!(
        mesh.warnings,
        Vec::<String>::new(),
        "every field is honoured"
    );
    // The sidecar's own flags, as injected, parse too.
    let pod = injected_pod();
    let proxy = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-proxy")
        .unwrap();
    let args = strings(&proxy["args"]);
    run_ok("proxy", &[&args[..], &["--help"]].concat());
    // Every webhook has its Service.
    let objects = objects();
    let services: BTreeSet<&str> = of_kind(&objects, "Service")
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        for config in of_kind(&objects, kind) {
            for webhook in config["webhooks"].as_array().unwrap() {
                let service = webhook["clientConfig"]["service"]["name"].as_str().unwrap();
                assert!(services.contains(service), "{kind}: no Service {service}");
                assert!(
                    webhook["failurePolicy"].is_string(),
                    "failurePolicy is chosen"
                );
            }
        }
    }
}
