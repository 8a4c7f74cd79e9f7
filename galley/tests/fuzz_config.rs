//! Config fuzzed: any text as a YAML file, and objects of every kind Galley
//! serves with any spec, parse to objects or an error naming where, and
//! every parsed object validates to problems or none, alone and with its
//! references. The validating webhook answers any AdmissionReview with a
//! verdict for its uid, and anything else with a client error. Never a
//! panic: config comes from users and from the Kubernetes API.

use galley::validation::{validate, validate_all, validate_references};
use mesh_api::{kinds::KINDS, object::ConfigObject};
use proptest::prelude::*;
use serde_json::{Value, json};
use testkit::fuzz;

/// Field names of Istio's config.
const KEYS: &[&str] = &[
    "hosts",
    "gateways",
    "http",
    "tcp",
    "tls",
    "match",
    "route",
    "destination",
    "host",
    "subset",
    "port",
    "number",
    "name",
    "protocol",
    "weight",
    "timeout",
    "retries",
    "attempts",
    "perTryTimeout",
    "fault",
    "abort",
    "delay",
    "percentage",
    "value",
    "httpStatus",
    "uri",
    "prefix",
    "exact",
    "regex",
    "headers",
    "servers",
    "selector",
    "bind",
    "mode",
    "credentialName",
    "subsets",
    "labels",
    "trafficPolicy",
    "loadBalancer",
    "simple",
    "consistentHash",
    "connectionPool",
    "outlierDetection",
    "portLevelSettings",
    "endpoints",
    "address",
    "ports",
    "resolution",
    "location",
    "addresses",
    "exportTo",
    "workloadSelector",
    "ingress",
    "egress",
    "defaultEndpoint",
    "peers",
    "mtls",
    "origins",
    "jwt",
    "issuer",
    "jwksUri",
    "principalBinding",
    "targets",
    "rules",
    "services",
    "methods",
    "paths",
    "subjects",
    "user",
    "properties",
    "roleRef",
    "kind",
    "actions",
    "handler",
    "instances",
    "compiledTemplate",
    "compiledAdapter",
    "params",
    "dimensions",
    "attributes",
    "valueType",
    "corsPolicy",
    "allowOrigin",
    "mirror",
    "rewrite",
    "redirect",
    "sniHosts",
    "sourceLabels",
];

/// Values Istio's config holds: hosts, modes, durations, ports.
const STRINGS: &[&str] = &[
    "*",
    "*.example.com",
    "reviews",
    "reviews.shop.svc.cluster.local",
    "mesh",
    "HTTP",
    "TCP",
    "TLS",
    "GRPC",
    "ISTIO_MUTUAL",
    "SIMPLE",
    "MUTUAL",
    "STRICT",
    "PERMISSIVE",
    "AUTO_PASSTHROUGH",
    "STATIC",
    "DNS",
    "NONE",
    "1s",
    "-1s",
    "1.5s",
    "10ms",
    "0",
    "80",
    "10.0.0.0/8",
    "./*",
    "~/*",
    "a.b/c",
    "",
];

fn json() -> impl Strategy<Value = Value> {
    fuzz::json(KEYS, STRINGS)
}

/// An object of any kind Galley serves, its spec anything.
fn object() -> impl Strategy<Value = Value> {
    (prop::sample::select(KINDS), json(), any::<String>()).prop_map(|(kind, spec, name)| {
        json!({
            "apiVersion": kind.api_version,
            "kind": kind.kind,
            "metadata": {"name": if name.is_empty() { "x".into() } else { name }, "namespace": "shop"},
            "spec": spec,
        })
    })
}

/// Every object the examples hold, as JSON: valid config to mutate, so
/// that mutants get past parsing into validation.
fn examples() -> Vec<Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    for dir in ["bookinfo", "mixer", "multicluster"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let objects = ConfigObject::parse_yaml(&text, &path.display().to_string()).unwrap();
                out.extend(objects.iter().map(ConfigObject::to_json));
            }
        }
    }
    out
}

/// The JSON pointers of every node of `value`.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            let at = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            out.push(at.clone());
            pointers(v, at, out);
        }),
        Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| {
            let at = format!("{at}/{i}");
            out.push(at.clone());
            pointers(v, at, out);
        }),
        _ => {}
    }
}

/// An example with a few of its nodes replaced by anything.
fn mutant() -> impl Strategy<Value = Value> {
    let examples = examples();
    let count = examples.len();
    (
        0..count,
        proptest::collection::vec((any::<prop::sample::Index>(), json()), 1..4),
    )
        .prop_map(move |(i, edits)| {
            let mut object = examples[i].clone();
            for (at, replacement) in edits {
                let mut all = Vec::new();
                pointers(&object, String::new(), &mut all);
                if all.is_empty() {
                    break;
                }
                if let Some(node) = object.pointer_mut(&all[at.index(all.len())]) {
                    *node = replacement;
                }
            }
            object
        })
}

/// Parses `objects` as Galley does, and validates what parses: alone,
/// together, and their references; then writes each out as it is served.
fn parse_and_validate(objects: Vec<Value>) {
    let parsed: Vec<ConfigObject> = objects
        .into_iter()
        .enumerate()
        .filter_map(|(i, o)| ConfigObject::from_json(o, &format!("document {i}")).ok())
        .collect();
    for object in &parsed {
        let _ = validate(object);
        let _ = object.to_json();
    }
    let all: Vec<&ConfigObject> = parsed.iter().collect();
    let _ = validate_all(&all);
    let _ = validate_references(&all);
}

/// What the validating webhook answers to `body`: status and JSON.
fn review(body: Vec<u8>) -> (u16, Option<Value>) {
    use tower::ServiceExt;
    let request = axum::http::Request::post("/validate")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = galley::webhook::router().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).ok())
    })
}

/// An AdmissionReview of `object`, as the API server sends it.
fn admission_review(uid: &str, operation: &str, object: Value) -> Value {
    let (group, version) = object["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .unwrap_or(("", "v1"));
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": object["kind"]},
            "resource": {"group": group, "version": version, "resource": "things"},
            "operation": operation,
            "userInfo": {},
            "object": object,
        }
    })
}

proptest! {
    #[test]
    fn the_webhook_answers_any_review_for_its_uid(
        object in prop_oneof![mutant(), object(), json()],
        operation in prop::sample::select(vec!["CREATE", "UPDATE", "DELETE", "CONNECT"]),
        uid in "[a-f0-9-]{1,36}",
    ) {
        let body = serde_json::to_vec(&admission_review(&uid, operation, object)).unwrap();
        let (status, answer) = review(body);
        prop_assert!(status == 200 || (400..500).contains(&status), "status {status}");
        if status == 200 {
            let answer = answer.expect("a JSON review");
            prop_assert_eq!(&answer["response"]["uid"], &json!(uid));
            prop_assert!(answer["response"]["allowed"].is_boolean());
        }
    }

    #[test]
    fn the_webhook_refuses_any_bytes_with_a_client_error(
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let (status, _) = review(body);
        prop_assert!(status == 200 || (400..500).contains(&status), "status {status}");
    }

    #[test]
    fn any_mutant_of_the_examples_parses_and_validates_or_is_refused(
        objects in proptest::collection::vec(mutant(), 1..6),
    ) {
        parse_and_validate(objects);
    }

    #[test]
    fn any_text_parses_or_is_refused(text in any::<String>()) {
        let _ = ConfigObject::parse_yaml(&text, "any.yaml");
    }

    #[test]
    fn any_spec_of_any_kind_parses_and_validates_or_is_refused(
        objects in proptest::collection::vec(object(), 1..4),
    ) {
        parse_and_validate(objects);
    }
}
