//! Every config kind round-trips YAML -> message -> protobuf bytes ->
//! message -> JSON -> message with nothing lost, on realistic documents, and
//! bad documents are refused with errors that say where and why.

use std::collections::BTreeSet;

use mesh_api::{
    kinds::{self, Body, BodyType},
    object::ConfigObject,
};
use serde_json::json;

fn load(file: &str) -> Vec<ConfigObject> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    ConfigObject::parse_yaml(&text, file).unwrap_or_else(|e| panic!("{e}"))
}

/// bytes and JSON both carry the whole message.
fn assert_round_trips(body: &Body) {
    let ty = body.body_type();
    let from_bytes = ty.decode(&body.encode_to_vec()).unwrap();
    assert_eq!(&from_bytes, body, "protobuf round trip of {ty:?}");
    let json = from_bytes.to_json();
    let from_json = ty.from_json(json.clone()).unwrap();
    assert_eq!(&from_json, body, "JSON round trip of {ty:?}: {json}");
}

/// Every object of every test file.
fn load_all() -> Vec<ConfigObject> {
    [
        "networking.yaml",
        "security.yaml",
        "policy.yaml",
        "mixer.yaml",
    ]
    .iter()
    .flat_map(|f| load(f))
    .collect()
}

#[test]
fn every_object_kind_round_trips() {
    let objects = load_all();
    for object in &objects {
        assert_round_trips(&object.body);
        let resource = object.to_resource();
        let any = resource.body.unwrap();
        assert_eq!(any.type_url, object.kind.body.type_url());
        assert_eq!(object.kind.body.decode(&any.value).unwrap(), object.body);
    }
    // Every message type an object can have (Mixer's free-form legacy kinds
    // share one).
    let covered: BTreeSet<_> = objects
        .iter()
        .map(|o| format!("{:?}", o.kind.body))
        .collect();
    let all: BTreeSet<_> = kinds::KINDS
        .iter()
        .filter(|k| !k.api_version.is_empty())
        .map(|k| format!("{:?}", k.body))
        .collect();
    assert_eq!(
        covered, all,
        "test data must hold every object message type"
    );
}

#[test]
fn mesh_config_round_trips() {
    let path = format!("{}/tests/data/meshconfig.yaml", env!("CARGO_MANIFEST_DIR"));
    let value: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let body = BodyType::MeshConfig.from_json(value).unwrap();
    assert_round_trips(&body);
    let json = body.to_json();
    assert_eq!(
        json["defaultConfig"]["tracing"]["zipkin"]["address"],
        "zipkin.istio-system:9411"
    );
    assert_eq!(
        json["localityLbSetting"]["distribute"][0]["to"]["us-west/zone1/*"],
        80
    );
    assert_eq!(json["accessLogEncoding"], "JSON");
}

#[test]
fn parsed_values_land_in_the_right_fields() {
    let objects = load("networking.yaml");
    let Body::VirtualService(vs) = &objects[0].body else {
        panic!("first is a VirtualService")
    };
    assert_eq!(objects[0].mcp_name(), "bookinfo/reviews");
    let first = &vs.http[0];
    assert_eq!(
        first.timeout.as_ref().map(|d| (d.seconds, d.nanos)),
        Some((2, 500_000_000))
    );
    assert_eq!(first.retries.as_ref().unwrap().attempts, 3);
    assert_eq!(first.r#match[0].port, 9080);
    assert_eq!(vs.http[1].route[1].weight, 25);

    let json = objects[0].body.to_json();
    assert_eq!(
        json["http"][0]["match"][0]["headers"]["end-user"],
        json!({"exact": "jason"})
    );
    assert_eq!(
        json["http"][0]["match"][0]["queryParams"]["debug"],
        json!({"exact": "1"})
    );
    assert_eq!(json["http"][1]["fault"]["abort"]["httpStatus"], 503);
    assert_eq!(json["http"][1]["corsPolicy"]["allowCredentials"], true);
    assert_eq!(json["http"][0]["retries"]["perTryTimeout"], "0.500s");

    let security = load("security.yaml");
    assert_eq!(
        security[0].mcp_name(),
        "default",
        "MeshPolicy is cluster-scoped"
    );
    let binding = security
        .iter()
        .find(|o| o.kind.kind == "ServiceRoleBinding")
        .unwrap();
    assert_eq!(binding.body.to_json()["roleRef"]["name"], "products-viewer");

    let filter = objects
        .iter()
        .find(|o| o.kind.kind == "EnvoyFilter")
        .unwrap();
    assert_eq!(
        filter.body.to_json()["filters"][0]["filterConfig"]["nested"]["list"],
        json!(["a", 1.0, false, null])
    );
}

#[test]
fn mixer_kinds_keep_istio_1_1_type_urls() {
    let objects = load("mixer.yaml");
    let url = |kind: &str| {
        objects
            .iter()
            .find(|o| o.kind.kind == kind)
            .unwrap()
            .kind
            .body
            .type_url()
    };
    assert_eq!(
        url("HTTPAPISpec"),
        "type.googleapis.com/istio.mixer.v1.config.client.HTTPAPISpec"
    );
    assert_eq!(
        url("memquota"),
        "type.googleapis.com/google.protobuf.Struct",
        "as Istio 1.1's Galley sends it"
    );
    let memquota = objects.iter().find(|o| o.kind.kind == "memquota").unwrap();
    assert_eq!(
        memquota.kind.collection,
        "istio/config/v1alpha2/legacy/memquotas"
    );
    assert_eq!(
        memquota.body.to_json()["quotas"][0]["overrides"][0]["validDuration"],
        "5s"
    );
}

#[test]
fn versions_follow_content() {
    let a = load("networking.yaml").remove(0);
    let mut b = a.clone();
    assert_eq!(a.to_resource().metadata, b.to_resource().metadata);
    b.labels.insert("extra".into(), "label".into());
    assert_ne!(
        a.to_resource().metadata.unwrap().version,
        b.to_resource().metadata.unwrap().version
    );
}

#[test]
fn default_namespace_is_applied() {
    let text =
        "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n";
    let objects = ConfigObject::parse_yaml(text, "gw.yaml").unwrap();
    assert_eq!(objects[0].mcp_name(), "default/gw");
}

fn parse_error(text: &str) -> String {
    ConfigObject::parse_yaml(text, "bad.yaml")
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_documents_are_refused_with_where_and_why() {
    let unknown_field = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec:\n  http:\n  - route:\n    - destination: {host: a}\n      wieght: 3\n";
    let e = parse_error(unknown_field);
    assert!(
        e.contains("bad.yaml: document 1 (VirtualService ns/r)"),
        "{e}"
    );
    assert!(
        e.contains("spec.http[0].route[0]") && e.contains("wieght"),
        "{e}"
    );

    let wrong_type = "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: gw}\n---\napiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST\n";
    let e = parse_error(wrong_type);
    assert!(
        e.contains("document 2 (DestinationRule default/d)")
            && e.contains("spec.trafficPolicy.loadBalancer.simple"),
        "{e}"
    );

    let bad_duration = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  http:\n  - timeout: soon\n";
    assert!(parse_error(bad_duration).contains("spec.http[0].timeout"));

    let e = parse_error("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
    assert!(e.contains("unknown kind \"ConfigMap\""), "{e}");

    let e = parse_error("apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nspec: {}\n");
    assert!(e.contains("metadata.name is missing"), "{e}");

    let e = parse_error("kind: [unterminated\n");
    assert!(e.contains("invalid YAML"), "{e}");
}

#[test]
fn objects_print_back_to_the_same_object() {
    for object in load("networking.yaml")
        .into_iter()
        .chain(load("security.yaml"))
    {
        let mut again = ConfigObject::from_json(object.to_json(), "printed").unwrap();
        again.location = object.location.clone();
        assert_eq!(again, object);
    }
}

#[test]
fn the_same_document_always_gets_the_same_version() {
    let versions = || -> Vec<String> {
        load_all()
            .iter()
            .map(|o| o.to_resource().metadata.unwrap().version)
            .collect()
    };
    let first = versions();
    for _ in 0..20 {
        assert_eq!(versions(), first);
    }
}

/// `n` ServiceEntries, each its own document.
fn entries(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {{name: s{i}, namespace: shop}}\nspec:\n  hosts: [s{i}.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn a_file_of_thousands_of_objects_parses_within_the_default_limits() {
    // 1,000 services with a DestinationRule each is 2,000 documents: more
    // than the YAML parser's own default of 1,024.
    assert_eq!(
        ConfigObject::parse_yaml(&entries(2_000), "big.yaml")
            .unwrap()
            .len(),
        2_000
    );
}

#[test]
fn each_limit_is_named_when_a_file_breaks_it() {
    use mesh_api::object::{Limit, YamlLimits};
    let limits = YamlLimits {
        documents: 10,
        bytes: 4_096,
        depth: 8,
    };
    let parse = |text: &str| ConfigObject::parse_yaml_within(text, "f.yaml", &limits);
    assert_eq!(parse(&entries(10)).unwrap().len(), 10);

    let e = parse(&entries(11)).unwrap_err();
    assert_eq!(e.exceeded, Some(Limit::Documents));
    assert_eq!(
        e.to_string(),
        "f.yaml: more than 10 YAML documents in one file"
    );

    let big = format!("# {}\n{}", "x".repeat(4_096), entries(1));
    let e = parse(&big).unwrap_err();
    assert_eq!(e.exceeded, Some(Limit::Bytes));
    assert!(e.message.contains("over the limit of 4096 bytes"), "{e}");

    let deep = format!("a: {}1{}\n", "[".repeat(9), "]".repeat(9));
    let e = parse(&deep).unwrap_err();
    assert_eq!(e.exceeded, Some(Limit::Depth));
    assert!(e.message.contains("over the limit of 8"), "{e}");

    // Not a bound: plain bad YAML says so, and names no limit.
    let e = parse("a: [").unwrap_err();
    assert_eq!(e.exceeded, None);
    assert!(e.message.starts_with("invalid YAML"), "{e}");
}
