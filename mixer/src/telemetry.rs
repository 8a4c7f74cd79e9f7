//! Report dispatch and the Prometheus exporter. Each reported bag runs the
//! rules whose match holds; a prometheus handler records, for each metric
//! instance it exports, the instance's value under its labels. Metrics are
//! exported as `istio_<name>` (Istio's names: `istio_requests_total`, ...)
//! on the telemetry role's `/metrics`.

use std::{
    collections::{BTreeMap, HashMap},
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

use crate::{
    attributes::{Bag, Value},
    check::applies,
    config::{Adapter, Config, MetricInfo, MetricKind, Template},
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

/// Istio's default distribution buckets: exponential, 1 ms to about 10 s.
fn default_buckets() -> Vec<f64> {
    (0..20).map(|i| 0.001 * 1.6f64.powi(i)).collect()
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

/// Runs the rules over one reported bag.
pub fn report(config: &Config, bag: &Bag, exporter: &Exporter) {
    let mut referenced = Referenced::default();
    for rule in &config.rules {
        let Some(exporting) = rule.actions.iter().find_map(|a| match &a.handler.adapter {
            Adapter::Prometheus(p) => Some((a, p)),
            _ => None,
        }) else {
            continue;
        };
        if !applies(rule, bag, &mut referenced) {
            continue;
        }
        let (action, prometheus) = exporting;
        for instance in &action.instances {
            let Template::Metric { value, dimensions } = &instance.template else {
                continue;
            };
            let Some(info) = prometheus
                .metrics
                .iter()
                .find(|m| names(&m.instance_name, &instance.name))
            else {
                continue;
            };
            let number = match expr::eval(value, bag, &mut referenced) {
                Ok(Value::Int64(n)) => n as f64,
                Ok(Value::Double(n)) => n,
                Ok(Value::Duration(d)) => d.seconds as f64 + f64::from(d.nanos) / 1e9,
                Ok(other) => {
                    tracing::debug!(instance = %instance.name, ?other, "not a number");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(instance = %instance.name, "value not evaluated: {e}");
                    continue;
                }
            };
            match expr::eval_labels(dimensions, bag, &mut referenced) {
                Ok(labels) => exporter.record(info, &labels, number),
                Err(e) => {
                    tracing::debug!(instance = %instance.name, "dimensions not evaluated: {e}")
                }
            }
        }
    }
}

/// Whether `reference` (a metric's `instanceName`) names the instance
/// `ns/name`: as Istio's full `name.metric.ns`, `name`, or `ns/name`.
fn names(reference: &str, instance: &str) -> bool {
    let Some((ns, name)) = instance.split_once('/') else {
        return reference == instance;
    };
    reference == instance || reference == name || reference == format!("{name}.metric.{ns}")
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
    - {name: requests_total, instanceName: requestcount.metric.istio-system, kind: COUNTER,
       labelNames: [destination_service, response_code]}
    - {name: request_duration_seconds, instanceName: requestduration.metric.istio-system,
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
        let exporter = Exporter::default();
        report(&config, &request(200, 5), &exporter);
        report(&config, &request(200, 50), &exporter);
        report(&config, &request(503, 500), &exporter);
        // Not HTTP: the rule does not hold.
        let mut tcp = request(200, 5);
        tcp.insert("context.protocol".into(), Value::String("tcp".into()));
        report(&config, &tcp, &exporter);

        let text = exporter.render();
        assert!(text.contains(r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="200"} 2"#), "{text}");
        assert!(text.contains(r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="503"} 1"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_bucket{le="0.01",destination_service="ratings.shop.svc.cluster.local"} 1"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_bucket{le="0.1",destination_service="ratings.shop.svc.cluster.local"} 2"#), "{text}");
        assert!(text.contains(r#"istio_request_duration_seconds_count{destination_service="ratings.shop.svc.cluster.local"} 3"#), "{text}");
    }

    #[test]
    fn bucket_shapes() {
        use crate::config::Buckets;
        let linear = Buckets::LinearBuckets {
            num_finite_buckets: 3.0,
            width: 10.0,
            offset: 1.0,
        };
        assert_eq!(linear.bounds(), [11.0, 21.0, 31.0]);
        let exponential = Buckets::ExponentialBuckets {
            num_finite_buckets: 3.0,
            growth_factor: 10.0,
            scale: 0.001,
        };
        let bounds = exponential.bounds();
        assert!(
            (bounds[0] - 0.01).abs() < 1e-12 && (bounds[2] - 1.0).abs() < 1e-9,
            "{bounds:?}"
        );
    }
}
