//! Report dispatch: each reported bag runs the rules whose match holds. A
//! prometheus handler records, for each metric instance it exports, the
//! instance's value under its labels, exported as `istio_<name>` (Istio's
//! names: `istio_requests_total`, ...) on the telemetry role's `/metrics`;
//! a stdio handler writes each log entry instance as an access log line.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use mixer_client::attributes::{Bag, Value};

use crate::{
    check::applies,
    config::{Action, Adapter, Config, MetricInfo, MetricKind, Stdio, Template},
    expr::{self, Referenced},
};

type Labels = Vec<(String, String)>;

/// Histograms of one metric's buckets.
#[derive(Clone)]
struct Buckets(Arc<Vec<f64>>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// The buckets of a distribution that names none: Prometheus' defaults,
/// as Istio's adapter uses.
fn default_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

#[derive(Clone)]
enum Metric {
    Counter(Family<Labels, Counter<f64, AtomicU64>>),
    Gauge(Family<Labels, Gauge<f64, AtomicU64>>),
    Distribution(Family<Labels, Histogram, Buckets>),
}

/// The exported metrics. Families are made the first time a metric is
/// recorded and then kept (Prometheus series do not change type).
#[derive(Default)]
pub struct Exporter {
    registry: Mutex<Registry>,
    /// By exported name.
    metrics: Mutex<HashMap<String, Exported>>,
}

/// A metric family with the definition it was made from.
struct Exported {
    kind: MetricKind,
    label_names: Vec<String>,
    metric: Metric,
}

impl Exporter {
    fn record(&self, info: &MetricInfo, labels: &BTreeMap<String, String>, value: f64) {
        let name = format!("istio_{}", info.name);
        let mut metrics = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        let exported = metrics.entry(name.clone()).or_insert_with(|| {
            let metric = match info.kind {
                MetricKind::Counter => Metric::Counter(Family::default()),
                MetricKind::Gauge => Metric::Gauge(Family::default()),
                MetricKind::Distribution => {
                    Metric::Distribution(Family::new_with_constructor(Buckets(Arc::new(
                        info.buckets
                            .as_ref()
                            .map_or_else(default_buckets, |b| b.bounds()),
                    ))))
                }
            };
            let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
            let help = info.description.as_str();
            match &metric {
                // prometheus-client adds `_total` to a counter's name.
                Metric::Counter(f) => registry.register(
                    name.strip_suffix("_total").unwrap_or(&name),
                    help,
                    f.clone(),
                ),
                Metric::Gauge(f) => registry.register(&name, help, f.clone()),
                Metric::Distribution(f) => registry.register(&name, help, f.clone()),
            }
            Exported {
                kind: info.kind,
                label_names: info.label_names.clone(),
                metric,
            }
        });
        if exported.kind != info.kind || exported.label_names != info.label_names {
            tracing::warn!(metric = %name, "metric redefined; the first definition stays until restart");
            return;
        }
        // Labels in the declared order; a label without a dimension is empty.
        let labels: Labels = exported
            .label_names
            .iter()
            .map(|l| (l.clone(), labels.get(l).cloned().unwrap_or_default()))
            .collect();
        match &exported.metric {
            Metric::Counter(f) => {
                f.get_or_create(&labels).inc_by(value);
            }
            Metric::Gauge(f) => {
                f.get_or_create(&labels).set(value);
            }
            Metric::Distribution(f) => f.get_or_create(&labels).observe(value),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Where Report's telemetry goes: the exported metrics, and the access
/// log (Mixer's stdout unless given another writer).
pub struct Outputs {
    pub metrics: Exporter,
    log: Mutex<Box<dyn Write + Send>>,
}

impl Default for Outputs {
    fn default() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }
}

impl Outputs {
    pub fn new(log: Box<dyn Write + Send>) -> Self {
        Self {
            metrics: Exporter::default(),
            log: Mutex::new(log),
        }
    }

    fn log(&self, line: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(log, "{line}").and_then(|()| log.flush()) {
            tracing::warn!(error = %e, "access log not written");
        }
    }
}

/// Runs the rules over one reported bag.
pub fn report(config: &Config, bag: &Bag, outputs: &Outputs) {
    let mut referenced = Referenced::default();
    for rule in &config.rules {
        let telemetry = |a: &&Action| {
            matches!(
                a.handler.adapter,
                Adapter::Prometheus(_) | Adapter::Stdio(_)
            )
        };
        if !rule.actions.iter().any(|a| telemetry(&a)) || !applies(rule, bag, &mut referenced) {
            continue;
        }
        for action in rule.actions.iter().filter(telemetry) {
            for instance in &action.instances {
                match (&action.handler.adapter, &instance.template) {
                    (Adapter::Prometheus(p), Template::Metric { value, dimensions }) => {
                        let Some(info) =
                            p.metrics.iter().find(|m| m.instance_name == instance.name)
                        else {
                            continue;
                        };
                        match metric(value, dimensions, bag, &mut referenced) {
                            Ok((number, labels)) => outputs.metrics.record(info, &labels, number),
                            Err(e) => {
                                tracing::debug!(instance = %instance.name, "not recorded: {e}")
                            }
                        }
                    }
                    (
                        Adapter::Stdio(stdio),
                        Template::LogEntry {
                            variables,
                            severity,
                            timestamp,
                        },
                    ) => {
                        let mut eval_or = |e: &Option<expr::Expr>, default: &str| {
                            e.as_ref()
                                .and_then(|e| expr::eval(e, bag, &mut referenced).ok())
                                .map_or(default.to_string(), |v| v.to_string())
                        };
                        let level = eval_or(severity, "info");
                        let time = eval_or(timestamp, "");
                        let fields: Vec<(String, Value)> = variables
                            .iter()
                            .filter_map(|(k, e)| {
                                Some((k.clone(), expr::eval(e, bag, &mut referenced).ok()?))
                            })
                            .collect();
                        outputs.log(&log_line(stdio, &instance.name, &level, &time, &fields));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn metric(
    value: &expr::Expr,
    dimensions: &BTreeMap<String, expr::Expr>,
    bag: &Bag,
    referenced: &mut Referenced,
) -> Result<(f64, BTreeMap<String, String>), String> {
    let number = match expr::eval(value, bag, referenced).map_err(|e| e.to_string())? {
        Value::Int64(n) => n as f64,
        Value::Double(n) => n,
        Value::Duration(d) => d.seconds as f64 + f64::from(d.nanos) / 1e9,
        other => return Err(format!("{other:?} is not a number")),
    };
    let labels = expr::eval_labels(dimensions, bag, referenced).map_err(|e| e.to_string())?;
    Ok((number, labels))
}

/// One access log line: JSON with `outputAsJson`, else `key=value` pairs
/// (values with spaces or quotes quoted).
fn log_line(
    stdio: &Stdio,
    instance: &str,
    level: &str,
    time: &str,
    fields: &[(String, Value)],
) -> String {
    if stdio.output_as_json {
        let mut object = serde_json::Map::new();
        object.insert("level".into(), level.into());
        if !time.is_empty() {
            object.insert("time".into(), time.into());
        }
        object.insert("instance".into(), instance.into());
        for (k, v) in fields {
            let json = match v {
                Value::Int64(n) => (*n).into(),
                Value::Double(n) => (*n).into(),
                Value::Bool(b) => (*b).into(),
                other => other.to_string().into(),
            };
            object.insert(k.clone(), json);
        }
        return serde_json::Value::Object(object).to_string();
    }
    let mut line = format!("level={level}");
    if !time.is_empty() {
        line.push_str(&format!(" time={time}"));
    }
    line.push_str(&format!(" instance={instance}"));
    for (k, v) in fields {
        let text = v.to_string();
        if text.is_empty() || text.contains([' ', '"', '=']) {
            line.push_str(&format!(" {k}={text:?}"));
        } else {
            line.push_str(&format!(" {k}={text}"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::compile;

    const REQUESTS: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions: {destination_service: destination.service.host, response_code: response.code | 200}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestduration, namespace: istio-system}
spec:
  compiledTemplate: metric
  params: {value: response.duration, dimensions: {destination_service: destination.service.host}}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: prometheus, namespace: istio-system}
spec:
  compiledAdapter: prometheus
  params:
    metrics:
    - {name: requests_total, instanceName: requestcount.instance.istio-system, kind: COUNTER,
       labelNames: [destination_service, response_code]}
    - {name: request_duration_seconds, instanceName: requestduration.instance.istio-system,
       kind: DISTRIBUTION, labelNames: [destination_service],
       buckets: {explicitBuckets: {bounds: [0.01, 0.1, 1]}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: promhttp, namespace: istio-system}
spec:
  match: context.protocol == "http"
  actions: [{handler: prometheus, instances: [requestcount, requestduration]}]
"#;

    fn request(code: i64, millis: i32) -> Bag {
        Bag::from([
            ("context.protocol".into(), Value::String("http".into())),
            (
                "destination.service.host".into(),
                Value::String("ratings.shop.svc.cluster.local".into()),
            ),
            ("response.code".into(), Value::Int64(code)),
            (
                "response.duration".into(),
                Value::Duration(pbjson_types::Duration {
                    seconds: 0,
                    nanos: millis * 1_000_000,
                }),
            ),
        ])
    }

    #[test]
    fn reports_become_istio_metrics() {
        let config = compile(REQUESTS);
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let outputs = Outputs::default();
        report(&config, &request(200, 5), &outputs);
        report(&config, &request(200, 50), &outputs);
        report(&config, &request(503, 500), &outputs);
        // Not HTTP: the rule does not hold.
        let mut tcp = request(200, 5);
        tcp.insert("context.protocol".into(), Value::String("tcp".into()));
        report(&config, &tcp, &outputs);

        let text = outputs.metrics.render();
        assert!(text.contains(r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="200"} 2"#), "{text}");
        assert!(text.contains(r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="503"} 1"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_bucket{le="0.01",destination_service="ratings.shop.svc.cluster.local"} 1"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_bucket{le="0.1",destination_service="ratings.shop.svc.cluster.local"} 2"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_count{destination_service="ratings.shop.svc.cluster.local"} 3"#), "{text}");
    }

    /// Istio 1.1's own telemetry config is written in the legacy kinds:
    /// `kind: metric` instances, a prometheus handler naming them
    /// `name.metric.namespace`.
    #[test]
    fn the_legacy_kinds_of_istios_own_config_run_too() {
        let config = compile(
            r#"
apiVersion: config.istio.io/v1alpha2
kind: metric
metadata: {name: requestcount, namespace: istio-system}
spec:
  value: "1"
  dimensions: {destination_service: destination.service.host, response_code: response.code | 200}
---
apiVersion: config.istio.io/v1alpha2
kind: prometheus
metadata: {name: handler, namespace: istio-system}
spec:
  metrics:
  - {name: requests_total, instance_name: requestcount.metric.istio-system, kind: COUNTER,
     label_names: [destination_service, response_code]}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: promhttp, namespace: istio-system}
spec:
  match: context.protocol == "http"
  actions: [{handler: handler.prometheus, instances: [requestcount.metric]}]
"#,
        );
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let outputs = Outputs::default();
        report(&config, &request(200, 5), &outputs);
        let text = outputs.metrics.render();
        assert!(text.contains(r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="200"} 1"#), "{text}");
    }

    #[test]
    fn a_metric_naming_no_instance_is_reported_and_exports_nothing() {
        // Istio 1.1 names a `kind: instance` object `name.instance.ns`;
        // `name.metric.ns` would be a legacy `kind: metric` object.
        let config = compile(&REQUESTS.replace(
            "requestcount.instance.istio-system",
            "requestcount.metric.istio-system",
        ));
        assert_eq!(config.problems.len(), 1, "{:?}", config.problems);
        assert!(
            config.problems[0].contains("requestcount.metric.istio-system"),
            "{:?}",
            config.problems
        );
        let outputs = Outputs::default();
        report(&config, &request(200, 5), &outputs);
        let text = outputs.metrics.render();
        assert!(!text.contains("istio_requests_total{"), "{text}");
        assert!(
            text.contains("istio_request_duration_seconds_count{"),
            "{text}"
        );
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn stdio_writes_access_log_lines() {
        let config = compile(
            r#"
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: accesslog, namespace: istio-system}
spec:
  compiledTemplate: logentry
  params:
    severity: '"warning"'
    variables: {destination: destination.service.host, responseCode: response.code, user: source.user | "unknown"}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: json, namespace: istio-system}
spec: {compiledAdapter: stdio, params: {outputAsJson: true}}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: text, namespace: istio-system}
spec: {compiledAdapter: stdio}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: stdio, namespace: istio-system}
spec:
  actions: [{handler: json, instances: [accesslog]}, {handler: text, instances: [accesslog]}]
"#,
        );
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let captured = Captured::default();
        let outputs = Outputs::new(Box::new(captured.clone()));
        report(&config, &request(503, 5), &outputs);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let json: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(json["level"], "warning");
        assert_eq!(json["instance"], "accesslog.instance.istio-system");
        assert_eq!(json["destination"], "ratings.shop.svc.cluster.local");
        assert_eq!(json["responseCode"], 503);
        assert_eq!(json["user"], "unknown");
        assert_eq!(
            lines[1],
            "level=warning instance=accesslog.instance.istio-system destination=ratings.shop.svc.cluster.local responseCode=503 user=unknown"
        );
    }

    #[test]
    fn bucket_shapes() {
        use crate::config::Buckets;
        let linear = Buckets::LinearBuckets {
            num_finite_buckets: 3.0,
            width: 10.0,
            offset: 1.0,
        };
        assert_eq!(linear.bounds(), [1.0, 11.0, 21.0, 31.0]);
        let exponential = Buckets::ExponentialBuckets {
            num_finite_buckets: 8.0,
            growth_factor: 10.0,
            scale: 1.0,
        };
        let bounds = exponential.bounds();
        assert_eq!(bounds.len(), 9);
        assert_eq!((bounds[0], bounds[8]), (1.0, 1e8));
    }
}
