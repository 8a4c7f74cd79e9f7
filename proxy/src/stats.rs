//! The proxy's own metrics, in the admin registry (so on `/metrics`,
//! `/stats/prometheus` on the admin port, and the stats port): requests by
//! direction, cluster and status, their latency per cluster, retries,
//! outlier ejections, and connections per listener.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub cluster: String,
    pub response_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

fn latency() -> Histogram {
    // Seconds, 0.5 ms to 10 s.
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

#[derive(Clone)]
pub struct Stats {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ClusterLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ClusterLabels, Counter>,
    pub ejections: Family<ClusterLabels, Counter>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    pub connections: Family<ListenerLabels, Counter>,
    limits: Family<LimitLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

impl Stats {
    pub fn new(registry: &mut Registry) -> Self {
        let stats = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            retries: Family::default(),
            ejections: Family::default(),
            connections_active: Family::default(),
            connections: Family::default(),
            limits: Family::default(),
        };
        registry.register(
            "requests",
            "HTTP requests by direction, cluster and response code",
            stats.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, per cluster",
            stats.request_duration.clone(),
        );
        registry.register(
            "retries",
            "Retried attempts, per cluster",
            stats.retries.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, per cluster",
            stats.ejections.clone(),
        );
        registry.register(
            "connections_active",
            "Downstream connections open, per listener",
            stats.connections_active.clone(),
        );
        registry.register(
            "connections",
            "Downstream connections accepted, per listener",
            stats.connections.clone(),
        );
        registry.register(
            "limit_reached",
            "Times a bound on what a downstream client may send was reached",
            stats.limits.clone(),
        );
        stats
    }

    /// Counts one time `limit` was reached.
    pub fn limit_reached(&self, limit: &'static str) {
        self.limits.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn cluster(name: &str) -> ClusterLabels {
        ClusterLabels {
            cluster: name.to_string(),
        }
    }
}
