//! The standard telemetry config the examples ship (`examples/mixer/`):
//! it compiles without a problem, and a reported HTTP request and TCP
//! connection become Istio 1.1's metrics with Istio's label names.

use std::collections::BTreeMap;

use mcp::SinkSnapshot;
use mesh_api::object::ConfigObject;
use mixer::{
    config::Config,
    telemetry::{Outputs, report},
};
use mixer_client::attributes::{Bag, Value};

fn config() -> Config {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mixer");
    let mut objects = Vec::new();
    for file in ["attributes.yaml", "telemetry.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        objects.extend(ConfigObject::parse_yaml(&text, file).unwrap());
    }
    Config::from_snapshot(&SinkSnapshot::from_objects(objects), &Config::default())
}

fn string(s: &str) -> Value {
    Value::String(s.into())
}

fn labels(pairs: &[(&str, &str)]) -> Value {
    Value::StringMap(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// What a server-side proxy reports about one request or connection.
fn reported(protocol: &str) -> Bag {
    Bag::from([
        ("context.reporter.kind".into(), string("inbound")),
        ("context.protocol".into(), string(protocol)),
        ("source.workload.name".into(), string("productpage-v1")),
        ("source.workload.namespace".into(), string("shop")),
        (
            "source.principal".into(),
            string("cluster.local/ns/shop/sa/productpage"),
        ),
        (
            "source.labels".into(),
            labels(&[("app", "productpage"), ("version", "v1")]),
        ),
        ("destination.workload.name".into(), string("reviews-v2")),
        ("destination.workload.namespace".into(), string("shop")),
        (
            "destination.principal".into(),
            string("cluster.local/ns/shop/sa/reviews"),
        ),
        (
            "destination.labels".into(),
            labels(&[("app", "reviews"), ("version", "v2")]),
        ),
        (
            "destination.service.host".into(),
            string("reviews.shop.svc.cluster.local"),
        ),
        ("destination.service.name".into(), string("reviews")),
        ("destination.service.namespace".into(), string("shop")),
        ("connection.mtls".into(), Value::Bool(true)),
        ("response.code".into(), Value::Int64(200)),
        (
            "response.duration".into(),
            Value::Duration(pbjson_types::Duration {
                seconds: 0,
                nanos: 7_000_000,
            }),
        ),
        ("request.size".into(), Value::Int64(120)),
        ("response.size".into(), Value::Int64(3_000)),
        ("connection.sent.bytes".into(), Value::Int64(1_024)),
        ("connection.received.bytes".into(), Value::Int64(2_048)),
    ])
}

#[test]
fn the_standard_metrics_carry_istios_labels() {
    let config = config();
    assert!(config.problems.is_empty(), "{:#?}", config.problems);
    let outputs = Outputs::default();
    report(&config, &reported("http"), &outputs);
    report(&config, &reported("tcp"), &outputs);
    // A kubelet probe is not a request anyone made.
    let mut probe = reported("http");
    probe.insert("request.useragent".into(), string("kube-probe/1.14"));
    report(&config, &probe, &outputs);
    let text = outputs.metrics.render();

    let common = [
        ("reporter", "destination"),
        ("source_app", "productpage"),
        ("source_principal", "cluster.local/ns/shop/sa/productpage"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "shop"),
        ("source_version", "v1"),
        ("destination_app", "reviews"),
        ("destination_principal", "cluster.local/ns/shop/sa/reviews"),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", "shop"),
        ("destination_version", "v2"),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    let mut http: Vec<(&str, &str)> = common.to_vec();
    http.extend([
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("permissive_response_code", "none"),
        ("permissive_response_policyid", "none"),
    ]);
    let with_le = |le: &'static str| {
        let mut labels = http.clone();
        labels.push(("le", le));
        labels
    };
    let samples = parse(&text);
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    };
    // Exactly Istio's labels, and only one request: the probe is not counted.
    assert_eq!(value("istio_requests_total", &http), Some(1.0), "{text}");
    assert_eq!(
        value("istio_request_duration_seconds_bucket", &with_le("0.005")),
        Some(0.0)
    );
    assert_eq!(
        value("istio_request_duration_seconds_bucket", &with_le("0.01")),
        Some(1.0)
    );
    assert_eq!(
        value("istio_request_bytes_bucket", &with_le("100.0")),
        Some(0.0)
    );
    assert_eq!(
        value("istio_request_bytes_bucket", &with_le("1000.0")),
        Some(1.0)
    );
    assert_eq!(
        value("istio_response_bytes_bucket", &with_le("10000.0")),
        Some(1.0)
    );
    assert_eq!(
        value("istio_tcp_sent_bytes_total", &common),
        Some(1024.0),
        "{text}"
    );
    assert_eq!(
        value("istio_tcp_received_bytes_total", &common),
        Some(2048.0)
    );
}

/// The samples of the text format: name, labels, value.
fn parse(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((name.to_string(), labels, value.parse().ok()?))
        })
        .collect()
}

#[test]
fn times_no_clock_can_hold_become_labels_not_panics() {
    // A Report carries whatever a client put in it: request.time at the
    // end of i64, a negative duration. Both reach a label as text.
    let yaml = "
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: timed, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: '1'
    dimensions:
      at: request.time
      took: response.duration
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: prometheus, namespace: istio-system}
spec:
  compiledAdapter: prometheus
  params:
    metrics:
    - name: timed_total
      instance_name: timed.instance.istio-system
      kind: COUNTER
      label_names: [at, took]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: timed, namespace: istio-system}
spec:
  actions:
  - handler: prometheus
    instances: [timed]
";
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mixer");
    let mut objects = ConfigObject::parse_yaml(
        &std::fs::read_to_string(dir.join("attributes.yaml")).unwrap(),
        "a",
    )
    .unwrap();
    objects.extend(ConfigObject::parse_yaml(yaml, "timed.yaml").unwrap());
    let config = Config::from_snapshot(&SinkSnapshot::from_objects(objects), &Config::default());
    assert!(config.problems.is_empty(), "{:#?}", config.problems);
    let outputs = Outputs::default();
    let bag = Bag::from([
        (
            "request.time".into(),
            Value::Timestamp(pbjson_types::Timestamp {
                seconds: i64::MAX,
                nanos: i32::MAX,
            }),
        ),
        (
            "response.duration".into(),
            Value::Duration(pbjson_types::Duration {
                seconds: i64::MIN,
                nanos: i32::MIN,
            }),
        ),
    ]);
    report(&config, &bag, &outputs);
    let text = outputs.metrics.render();
    let (_, labels, count) = parse(&text)
        .into_iter()
        .find(|(name, _, _)| name == "istio_timed_total")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(count, 1.0);
    assert_eq!(
        labels["at"],
        format!("{}s+{}ns since 1970", i64::MAX, i32::MAX)
    );
    assert!(labels["took"].starts_with('-'), "{labels:?}");
}
