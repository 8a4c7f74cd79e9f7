//! The service graph and each service's golden signals, from the
//! telemetry Mixer's own metrics (`istio_requests_total` and
//! `istio_request_duration_seconds`, as Istio 1.1 labels them): scraped
//! at an interval and kept for a while, rates and latency quantiles are
//! worked out over a window ending at each scrape, as Kiali does over
//! Prometheus.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime},
};

use prometheus_parse::{Scrape, Value};
use serde::Serialize;

/// Who calls whom: the caller's app and the called service's name.
type EdgeKey = (String, String);

/// Counts since the Mixer started, for one edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: f64,
    /// Answered 4xx or 5xx (a denial is an error), or not answered.
    pub errors: f64,
    /// Over mutual TLS.
    pub mtls: f64,
    /// Latency histogram: upper bound (seconds), cumulative count.
    pub buckets: Vec<(f64, f64)>,
}

impl Counts {
    /// Adds `n` observations at or under `le` (series of one edge add up),
    /// keeping the buckets in order.
    fn add_bucket(&mut self, le: f64, n: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, count)) => *count += n,
            None => {
                self.buckets.push((le, n));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }
}

/// One scrape.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: SystemTime,
    pub edges: BTreeMap<EdgeKey, Counts>,
}

/// An edge over a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    pub rps: f64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// `mTLS`, `plaintext`, or `mixed`.
    pub security: &'static str,
    /// Requests in the window.
    pub requests: f64,
}

/// A service's golden signals over the window ending at one scrape.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub unix_ms: u64,
    pub rps: f64,
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A label's value, `unknown` when absent or empty.
fn label<'a>(labels: &'a prometheus_parse::Labels, name: &str) -> &'a str {
    labels
        .get(name)
        .filter(|v| !v.is_empty())
        .unwrap_or("unknown")
}

/// The edge a series belongs to: the caller's app (its workload when it
/// has no app label) to the service called.
fn edge_of(labels: &prometheus_parse::Labels) -> EdgeKey {
    let source = match label(labels, "source_app") {
        "unknown" => label(labels, "source_workload"),
        app => app,
    };
    let destination = match label(labels, "destination_service_name") {
        "unknown" => label(labels, "destination_service"),
        name => name,
    };
    (source.to_string(), destination.to_string())
}

/// The edges' counts in one scrape of the telemetry Mixers' metrics texts,
/// one per replica: each replica counts the Reports it was sent, so the
/// mesh's counts are their sum.
pub fn parse<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    at: SystemTime,
) -> anyhow::Result<Sample> {
    let mut edges: BTreeMap<EdgeKey, Counts> = BTreeMap::new();
    for text in texts {
        add(&mut edges, text)?;
    }
    Ok(Sample { at, edges })
}

/// Adds one Mixer's counts, from its metrics text, to `edges`.
fn add(edges: &mut BTreeMap<EdgeKey, Counts>, text: &str) -> anyhow::Result<()> {
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    for sample in &scrape.samples {
        match (sample.metric.as_str(), &sample.value) {
            ("istio_requests_total", Value::Counter(n) | Value::Untyped(n)) => {
                let code: u16 = label(&sample.labels, "response_code").parse().unwrap_or(0);
                let c = edges.entry(edge_of(&sample.labels)).or_default();
                c.requests += n;
                if code == 0 || code >= 400 {
                    c.errors += n;
                }
                if label(&sample.labels, "connection_security_policy") == "mutual_tls" {
                    c.mtls += n;
                }
            }
            ("istio_request_duration_seconds", Value::Histogram(buckets)) => {
                let c = edges.entry(edge_of(&sample.labels)).or_default();
                for b in buckets {
                    c.add_bucket(b.less_than, b.count);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// What happened between `old` and `new`; a counter that went down (the
/// Mixer restarted) counts from zero.
fn delta(new: &Counts, old: Option<&Counts>) -> Counts {
    let Some(old) = old.filter(|o| o.requests <= new.requests) else {
        return new.clone();
    };
    let before = |le: f64| {
        old.buckets
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n)
    };
    Counts {
        requests: new.requests - old.requests,
        errors: (new.errors - old.errors).max(0.0),
        mtls: (new.mtls - old.mtls).max(0.0),
        buckets: new
            .buckets
            .iter()
            .map(|(le, n)| (*le, (n - before(*le)).max(0.0)))
            .collect(),
    }
}

/// The `q` quantile of a cumulative histogram, in milliseconds, by linear
/// interpolation within the bucket it falls in (Prometheus'
/// `histogram_quantile`); `None` with no observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: that bound is the answer.
                return Some(lower.0 * 1000.0);
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                0.0
            };
            return Some((lower.0 + (le - lower.0) * within) * 1000.0);
        }
        lower = (le, count);
    }
    None
}

/// Scrapes kept for a while.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<Sample>,
    keep: Duration,
}

impl History {
    pub fn new(keep: Duration) -> Self {
        Self {
            samples: VecDeque::new(),
            keep,
        }
    }

    pub fn push(&mut self, sample: Sample) {
        let at = sample.at;
        self.samples.push_back(sample);
        while let Some(first) = self.samples.front() {
            match at.duration_since(first.at) {
                Ok(age) if age > self.keep => self.samples.pop_front(),
                _ => break,
            };
        }
    }

    /// The newest scrape at least `window` older than the one at `i`, else
    /// the oldest kept (`None` with nothing older than `i`).
    fn base(&self, i: usize, window: Duration) -> Option<&Sample> {
        let at = self.samples[i].at;
        let older = self.samples.range(..i);
        older
            .clone()
            .rev()
            .find(|s| at.duration_since(s.at).is_ok_and(|d| d >= window))
            .or_else(|| older.clone().next())
    }

    /// Each edge's rate, errors, latency and security over the `window`
    /// ending at the latest scrape; edges with no request in it are left
    /// out.
    pub fn graph(&self, window: Duration) -> Vec<Edge> {
        let Some(i) = self.samples.len().checked_sub(1) else {
            return Vec::new();
        };
        let latest = &self.samples[i];
        let base = self.base(i, window);
        let seconds = base
            .and_then(|b| latest.at.duration_since(b.at).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        latest
            .edges
            .iter()
            .filter_map(|((source, destination), counts)| {
                let d = delta(
                    counts,
                    base.and_then(|b| b.edges.get(&(source.clone(), destination.clone()))),
                );
                (d.requests > 0.0).then(|| Edge {
                    source: source.clone(),
                    destination: destination.clone(),
                    rps: if seconds > 0.0 {
                        d.requests / seconds
                    } else {
                        0.0
                    },
                    error_rate: d.errors / d.requests,
                    p50_ms: quantile(&d.buckets, 0.5),
                    p99_ms: quantile(&d.buckets, 0.99),
                    security: if d.mtls >= d.requests {
                        "mTLS"
                    } else if d.mtls == 0.0 {
                        "plaintext"
                    } else {
                        "mixed"
                    },
                    requests: d.requests,
                })
            })
            .collect()
    }

    /// Each called service's golden signals at every scrape kept, each
    /// over the `window` ending there.
    pub fn signals(&self, window: Duration) -> BTreeMap<String, Vec<Point>> {
        let mut out: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        for i in 1..self.samples.len() {
            let sample = &self.samples[i];
            let Some(base) = self.base(i, window) else {
                continue;
            };
            let seconds = sample
                .at
                .duration_since(base.at)
                .map_or(0.0, |d| d.as_secs_f64());
            let mut by_service: BTreeMap<&str, Counts> = BTreeMap::new();
            for ((source, destination), counts) in &sample.edges {
                let d = delta(
                    counts,
                    base.edges.get(&(source.clone(), destination.clone())),
                );
                let total = by_service.entry(destination).or_default();
                total.requests += d.requests;
                total.errors += d.errors;
                for (le, n) in d.buckets {
                    total.add_bucket(le, n);
                }
            }
            let unix_ms = sample
                .at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            for (service, c) in by_service {
                out.entry(service.to_string()).or_default().push(Point {
                    unix_ms,
                    rps: if seconds > 0.0 {
                        c.requests / seconds
                    } else {
                        0.0
                    },
                    error_rate: if c.requests > 0.0 {
                        c.errors / c.requests
                    } else {
                        0.0
                    },
                    p50_ms: quantile(&c.buckets, 0.5),
                    p99_ms: quantile(&c.buckets, 0.99),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two series of an edge, as the Mixer writes them.
    fn text(ok: u32, denied: u32, fast: u32, slow: u32) -> String {
        let labels = |code: u32, security: &str| {
            format!(
                "source_app=\"productpage\",source_workload=\"productpage-v1-0\",destination_service_name=\"details\",destination_service=\"details.bookinfo.svc.cluster.local\",response_code=\"{code}\",connection_security_policy=\"{security}\""
            )
        };
        format!(
            "# TYPE istio_requests counter\n\
             istio_requests_total{{{ok_labels}}} {ok}\n\
             istio_requests_total{{{denied_labels}}} {denied}\n\
             # TYPE istio_request_duration_seconds histogram\n\
             istio_request_duration_seconds_bucket{{le=\"0.005\",{ok_labels}}} {fast}\n\
             istio_request_duration_seconds_bucket{{le=\"0.01\",{ok_labels}}} {all}\n\
             istio_request_duration_seconds_bucket{{le=\"+Inf\",{ok_labels}}} {all}\n\
             istio_request_duration_seconds_sum{{{ok_labels}}} 1\n\
             istio_request_duration_seconds_count{{{ok_labels}}} {all}\n\
             # EOF\n",
            ok_labels = labels(200, "mutual_tls"),
            denied_labels = labels(403, "mutual_tls"),
            all = fast + slow,
        )
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    #[test]
    fn an_edge_has_its_rate_errors_latency_and_security_over_the_window() {
        let mut history = History::new(Duration::from_secs(600));
        history.push(parse([text(100, 0, 50, 50).as_str()], at(0)).unwrap());
        history.push(parse([text(110, 5, 50, 50).as_str()], at(5)).unwrap());
        // 20 ok and 5 denied in the 10 s since the first scrape; the 20
        // all took 5-10 ms.
        history.push(parse([text(120, 5, 50, 70).as_str()], at(10)).unwrap());
        let edges = history.graph(Duration::from_secs(10));
        assert_eq!(edges.len(), 1, "{edges:?}");
        let e = &edges[0];
        assert_eq!(
            (e.source.as_str(), e.destination.as_str()),
            ("productpage", "details")
        );
        assert_eq!(e.requests, 25.0);
        assert!((e.rps - 2.5).abs() < 1e-9, "{e:?}");
        assert!((e.error_rate - 0.2).abs() < 1e-9, "{e:?}");
        assert_eq!(e.security, "mTLS");
        assert_eq!(e.p50_ms, Some(7.5), "halfway through the 5-10 ms bucket");
        assert!((e.p99_ms.unwrap() - 9.95).abs() < 1e-9, "{e:?}");
        // Over the last 5 s only: 10 requests, all ok.
        let recent = history.graph(Duration::from_secs(5));
        assert_eq!(recent[0].requests, 10.0);
        assert_eq!(recent[0].error_rate, 0.0);

        let signals = history.signals(Duration::from_secs(5));
        let details = &signals["details"];
        assert_eq!(details.len(), 2, "a point per scrape after the first");
        assert!((details[0].rps - 3.0).abs() < 1e-9, "{details:?}");
        assert!((details[1].rps - 2.0).abs() < 1e-9, "{details:?}");
    }

    #[test]
    fn a_restarted_mixer_counts_from_zero_and_quiet_edges_are_left_out() {
        let mut history = History::new(Duration::from_secs(600));
        history.push(parse([text(100, 0, 10, 0).as_str()], at(0)).unwrap());
        history.push(parse([text(4, 0, 4, 0).as_str()], at(10)).unwrap());
        assert_eq!(history.graph(Duration::from_secs(10))[0].requests, 4.0);
        history.push(parse([text(4, 0, 4, 0).as_str()], at(20)).unwrap());
        assert!(history.graph(Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn the_replicas_counts_add_up() {
        let mut history = History::new(Duration::from_secs(600));
        let (a0, b0) = (text(100, 0, 50, 50), text(10, 0, 10, 0));
        history.push(parse([a0.as_str(), b0.as_str()], at(0)).unwrap());
        // 10 more at one replica, 20 (5 denied) at the other.
        let (a1, b1) = (text(110, 0, 60, 50), text(25, 5, 25, 0));
        history.push(parse([a1.as_str(), b1.as_str()], at(10)).unwrap());
        let e = &history.graph(Duration::from_secs(10))[0];
        assert_eq!(e.requests, 30.0);
        assert!((e.error_rate - 5.0 / 30.0).abs() < 1e-9, "{e:?}");
        // All 25 ok ones in the first bucket.
        assert!(e.p99_ms.unwrap() <= 5.0, "{e:?}");
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let buckets = [(0.01, 10.0), (0.1, 90.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(&buckets, 0.05), Some(5.0));
        assert!((quantile(&buckets, 0.5).unwrap() - 55.0).abs() < 1e-9);
        // In the open bucket: the last finite bound.
        assert_eq!(quantile(&buckets, 0.99), Some(100.0));
        assert_eq!(quantile(&[(0.01, 0.0)], 0.5), None);
    }

    #[test]
    fn history_keeps_what_is_young_enough() {
        let mut history = History::new(Duration::from_secs(60));
        for s in [0, 30, 61, 95] {
            history.push(parse([""], at(s)).unwrap());
        }
        assert_eq!(
            history.samples.len(),
            2,
            "0 and 30 are over a minute older than 95"
        );
    }
}
