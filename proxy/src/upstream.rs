//! Clusters at run time: their endpoints (from EDS, or fixed addresses and
//! names resolved by DNS), the per-endpoint state that outlives config
//! changes (requests in flight, consecutive failures, ejection), endpoint
//! selection by the cluster's load balancer, and a pooled HTTP client per
//! cluster. A cluster whose settings change gets a new pool; one whose
//! endpoints change keeps it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    config::{
        Snapshot,
        cluster::{Cluster, Discovery, Lb},
    },
    stats::Stats,
    tls::{Stream, TlsContext},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type requests and responses carry through the proxy.
pub type Body = BoxBody<Bytes, BoxError>;

/// One endpoint and what the proxy has seen of it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Requests in flight, for least-request balancing: counted by
    /// [`InFlight`], so that a request cancelled or timed out mid-way is
    /// not counted forever.
    active: AtomicUsize,
    consecutive_5xx: AtomicU32,
    /// How many times it was ejected; each ejection lasts longer.
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            active: AtomicUsize::new(0),
            consecutive_5xx: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    /// Requests in flight to it now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| now < t)
    }
}

/// A request in flight to an endpoint; dropping it, however the request
/// ended, stops counting it.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens connections for a cluster's pool: TCP, then TLS when the
/// cluster asks for it.
#[derive(Clone)]
pub struct Connector {
    cluster: Arc<Cluster>,
    tls: Arc<TlsContext>,
}

impl Connector {
    /// A connection to `addr` as the cluster speaks.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Stream, BoxError> {
        let tls = self.cluster.tls.as_ref().map(|t| (t, self.tls.as_ref()));
        Stream::connect(addr, self.cluster.connect_timeout, tls).await
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .ok_or("an upstream URI without an address")?
                .as_str()
                .parse()?;
            Ok(TokioIo::new(this.connect(addr).await?))
        })
    }
}

pub struct UpstreamCluster {
    pub config: Arc<Cluster>,
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    /// Consistent hashing's ring over the endpoints (ring-hash clusters).
    ring: RwLock<Arc<Ring>>,
    /// Outlier detection's sweeps are counted from here.
    created: Instant,
    next: AtomicUsize,
    pub connector: Connector,
    /// A connection pool per worker, so that a pooled connection is only
    /// used on the thread that drives it.
    clients: Vec<Client<Connector, Body>>,
    /// Ejections by outlier detection, ever.
    ejections: Counter,
    /// Requests in progress: the circuit breaker's connections (HTTP/1.1,
    /// a request per connection) or requests (HTTP/2).
    active: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for one of those.
    pending: AtomicUsize,
    /// Retries in progress.
    retries: AtomicUsize,
}

/// A retry in progress; dropping it frees its place.
pub struct RetryPlace<'a>(&'a AtomicUsize);

impl Drop for RetryPlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request admitted by the circuit breaker; dropping it frees its place.
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl UpstreamCluster {
    /// Admits a request, waiting while the cluster is at its limit of
    /// requests in progress, unless the pending queue is full too: then
    /// `None` at once (Envoy's overflow), rather than a growing queue.
    pub async fn admit(&self) -> Option<Admitted> {
        if let Ok(permit) = self.active.clone().try_acquire_owned() {
            return Some(Admitted { _permit: permit });
        }
        let limit = self.config.limits.max_pending_requests as usize;
        if self.pending.fetch_add(1, Ordering::AcqRel) >= limit {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = self.active.clone().acquire_owned().await.ok();
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit.map(|p| Admitted { _permit: p })
    }

    /// A place for one retry, `None` when the cluster has as many retries
    /// in progress as its circuit breaker allows.
    pub fn start_retry(&self) -> Option<RetryPlace<'_>> {
        let limit = self.config.limits.max_retries as usize;
        if self.retries.fetch_add(1, Ordering::AcqRel) >= limit {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RetryPlace(&self.retries))
    }

    /// The calling worker's client.
    pub fn client(&self) -> &Client<Connector, Body> {
        &self.clients[crate::workers::current() % self.clients.len()]
    }

    fn new(config: Arc<Cluster>, tls: Arc<TlsContext>, ejections: Counter, workers: usize) -> Self {
        let connector = Connector {
            cluster: config.clone(),
            tls,
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .http2_only(config.http2)
            .set_host(false)
            .pool_idle_timeout(Duration::from_secs(60));
        // A clone of a client shares its pool; each worker's is built anew.
        let clients = (0..workers.max(1))
            .map(|_| builder.build(connector.clone()))
            .collect();
        Self {
            endpoints: RwLock::new(Arc::default()),
            ring: RwLock::new(Arc::default()),
            created: Instant::now(),
            next: AtomicUsize::new(0),
            connector,
            clients,
            ejections,
            active: Arc::new(tokio::sync::Semaphore::new(
                (if config.http2 {
                    config.limits.max_requests
                } else {
                    config.limits.max_connections
                })
                .max(1) as usize,
            )),
            pending: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            config,
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the endpoints, keeping the state of those that remain.
    fn set_endpoints(&self, next: &[(SocketAddr, u32)]) {
        let current = self.endpoints();
        let kept: Vec<Arc<Endpoint>> = next
            .iter()
            .map(|(addr, weight)| {
                current
                    .iter()
                    .find(|e| e.addr == *addr && e.weight == *weight)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*addr, *weight)))
            })
            .collect();
        if let Lb::RingHash { minimum_ring_size } = self.config.lb {
            let ring = Ring::new(&kept, minimum_ring_size);
            *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
        }
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(kept);
    }

    /// An endpoint by the cluster's load balancer, avoiding `tried` when
    /// another is available. Ejected endpoints are skipped unless fewer
    /// than the panic threshold remain. An original-destination cluster
    /// has one endpoint: where the connection was going.
    pub fn pick(
        &self,
        tried: &[SocketAddr],
        hash: Option<u64>,
        destination: Option<SocketAddr>,
    ) -> Option<Arc<Endpoint>> {
        if self.config.discovery == Discovery::OriginalDst {
            return destination.map(|d| Arc::new(Endpoint::new(d, 1)));
        }
        let all = self.endpoints();
        if all.is_empty() {
            return None;
        }
        let now = Instant::now();
        let healthy: Vec<&Arc<Endpoint>> = all.iter().filter(|e| !e.ejected(now)).collect();
        let panic =
            (healthy.len() as f64) < (all.len() as f64) * self.config.panic_threshold / 100.0;
        let pool: Vec<&Arc<Endpoint>> = if panic || healthy.is_empty() {
            all.iter().collect()
        } else {
            healthy
        };
        let fresh: Vec<&Arc<Endpoint>> = pool
            .iter()
            .copied()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let candidates = if fresh.is_empty() { pool } else { fresh };
        let chosen = match (self.config.lb, hash) {
            (Lb::RingHash { .. }, Some(h)) => {
                let ring = self.ring.read().unwrap_or_else(|e| e.into_inner()).clone();
                let usable = |e: &Arc<Endpoint>| candidates.iter().any(|c| Arc::ptr_eq(c, e));
                return ring.pick(h, usable).or_else(|| Some(candidates[0].clone()));
            }
            (Lb::Random, _) | (Lb::RingHash { .. }, None) => {
                candidates[fastrand::usize(..candidates.len())]
            }
            (Lb::LeastRequest, _) => {
                // Power of two choices, as Envoy's least request does.
                let a = candidates[fastrand::usize(..candidates.len())];
                let b = candidates[fastrand::usize(..candidates.len())];
                if b.active() < a.active() { b } else { a }
            }
            (Lb::RoundRobin, _) => weighted_round_robin(&candidates, &self.next),
        };
        Some(chosen.clone())
    }

    /// Records an answer from `endpoint` for outlier detection: enough
    /// consecutive 5xx (or failures to connect) eject it for the base
    /// ejection time times the ejections so far, unless that would eject
    /// more than the allowed share of the cluster.
    pub fn record(&self, endpoint: &Endpoint, failed: bool) {
        let Some(outlier) = self.config.outlier else {
            return;
        };
        if !failed {
            endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
            return;
        }
        let failures = endpoint.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_5xx {
            return;
        }
        let now = Instant::now();
        let all = self.endpoints();
        let ejected = all.iter().filter(|e| e.ejected(now)).count();
        let allowed = (all.len() * outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed || endpoint.ejected(now) {
            return;
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let until = ejection_end(
            self.created,
            now,
            outlier.base_ejection_time * times,
            outlier.interval,
        );
        *endpoint
            .ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(until);
        endpoint.consecutive_5xx.store(0, Ordering::Relaxed);
        self.ejections.inc();
        tracing::info!(cluster = %self.config.name, endpoint = %endpoint.addr, "ejected for {failures} consecutive errors");
    }
}

fn weighted_round_robin<'a>(
    candidates: &[&'a Arc<Endpoint>],
    next: &AtomicUsize,
) -> &'a Arc<Endpoint> {
    let total: usize = candidates.iter().map(|e| e.weight as usize).sum();
    let mut slot = next.fetch_add(1, Ordering::Relaxed) % total.max(1);
    for e in candidates {
        if slot < e.weight as usize {
            return e;
        }
        slot -= e.weight as usize;
    }
    candidates[0]
}

/// When an ejection of `length` made at `now` ends: at the first of
/// outlier detection's sweeps, every `interval` since `created`, after it
/// has lasted that long, as Envoy returns ejected hosts only when it
/// sweeps.
fn ejection_end(created: Instant, now: Instant, length: Duration, interval: Duration) -> Instant {
    let due = now + length;
    if interval.is_zero() {
        return due;
    }
    let since = due.saturating_duration_since(created).as_nanos();
    let step = interval.as_nanos();
    let sweeps = since.div_ceil(step);
    created + Duration::from_nanos(u64::try_from(sweeps * step).unwrap_or(u64::MAX))
}

/// Consistent hashing's ring, built when the endpoints change, as Envoy's
/// ring hash: each endpoint gets points in proportion to its weight, at
/// least `minimum` points in all, so that a key keeps its endpoint while
/// the set stays the same and most keys keep theirs when it changes.
#[derive(Default)]
struct Ring {
    points: Vec<(u64, Arc<Endpoint>)>,
}

impl Ring {
    fn new(endpoints: &[Arc<Endpoint>], minimum: u64) -> Self {
        use std::hash::{Hash, Hasher};
        let total: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
        if total == 0 {
            return Self::default();
        }
        let per_weight = minimum.div_ceil(total).max(1);
        let mut points = Vec::new();
        for e in endpoints {
            for point in 0..per_weight * u64::from(e.weight.max(1)) {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (e.addr, point).hash(&mut h);
                points.push((h.finish(), e.clone()));
            }
        }
        points.sort_unstable_by_key(|(p, _)| *p);
        Self { points }
    }

    /// The endpoint of the first point at or after `hash`, going round,
    /// that `usable` accepts.
    fn pick(&self, hash: u64, usable: impl Fn(&Arc<Endpoint>) -> bool) -> Option<Arc<Endpoint>> {
        let start = self.points.partition_point(|(p, _)| *p < hash);
        let len = self.points.len();
        (0..len)
            .map(|i| &self.points[(start + i) % len].1)
            .find(|e| usable(e))
            .cloned()
    }
}

/// Every cluster of the current config.
pub struct Upstreams {
    clusters: RwLock<HashMap<String, Arc<UpstreamCluster>>>,
    tls: Arc<TlsContext>,
    pub stats: Stats,
    /// Workers, each with a connection pool per cluster.
    workers: usize,
}

impl Upstreams {
    pub fn new(tls: Arc<TlsContext>, stats: Stats, workers: usize) -> Self {
        Self {
            clusters: RwLock::default(),
            tls,
            stats,
            workers,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<UpstreamCluster>> {
        self.clusters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<UpstreamCluster>> {
        let clusters = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = clusters.values().cloned().collect();
        all.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        all
    }

    /// Brings the clusters in line with `snapshot`.
    pub async fn update(&self, snapshot: &Snapshot) {
        let mut next = HashMap::new();
        for (name, config) in &snapshot.clusters {
            let cluster = match self.get(name) {
                Some(c) if c.config == *config => c,
                _ => {
                    let ejections = self
                        .stats
                        .ejections
                        .get_or_create(&Stats::cluster(name))
                        .clone();
                    Arc::new(UpstreamCluster::new(
                        config.clone(),
                        self.tls.clone(),
                        ejections,
                        self.workers,
                    ))
                }
            };
            let endpoints = match &config.discovery {
                Discovery::Eds(service) => snapshot
                    .endpoints
                    .get(service)
                    .map(|e| e.as_ref().clone())
                    .unwrap_or_default(),
                Discovery::Fixed(targets) => resolve(targets).await,
                Discovery::OriginalDst | Discovery::BlackHole => Vec::new(),
            };
            cluster.set_endpoints(&endpoints);
            next.insert(name.clone(), cluster);
        }
        *self.clusters.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

/// Fixed endpoints: IP addresses as they are, names by DNS (a name that
/// does not resolve contributes nothing until the next config).
async fn resolve(targets: &[(String, u16)]) -> Vec<(SocketAddr, u32)> {
    let mut out = Vec::new();
    for (host, port) in targets {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            out.push((SocketAddr::new(ip, *port), 1));
            continue;
        }
        match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(addrs) => out.extend(addrs.map(|a| (a, 1))),
            Err(e) => tracing::warn!(%host, "not resolved: {e}"),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod testing {
    //! Clusters for the tests of what uses them.

    use super::*;
    use crate::config::cluster::Limits;

    /// A round-robin cluster over fixed `endpoints`, with Envoy's defaults.
    pub fn cluster(name: &str, endpoints: &[SocketAddr]) -> Cluster {
        Cluster {
            name: name.into(),
            discovery: Discovery::Fixed(
                endpoints
                    .iter()
                    .map(|a| (a.ip().to_string(), a.port()))
                    .collect(),
            ),
            lb: Lb::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            http2: false,
            limits: Limits::default(),
            outlier: None,
            tls: None,
            panic_threshold: 50.0,
        }
    }

    /// The proxy's clusters, as a config of `clusters` makes them.
    pub async fn upstreams(clusters: Vec<Cluster>) -> Arc<Upstreams> {
        let (_, credentials) = tokio::sync::watch::channel(None);
        let tls = Arc::new(TlsContext::new(credentials, Arc::default()));
        let stats = Stats::new(&mut prometheus_client::registry::Registry::default());
        let upstreams = Upstreams::new(tls, stats, 1);
        let snapshot = Snapshot {
            clusters: clusters
                .into_iter()
                .map(|c| (c.name.clone(), Arc::new(c)))
                .collect(),
            ..Default::default()
        };
        upstreams.update(&snapshot).await;
        Arc::new(upstreams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, weight: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            SocketAddr::from(([10, 0, 0, 1], port)),
            weight,
        ))
    }

    /// A cluster of `lb` over `endpoints` (port, weight).
    fn cluster(lb: Lb, endpoints: &[(u16, u32)]) -> UpstreamCluster {
        let config = Cluster {
            lb,
            ..testing::cluster("c", &[])
        };
        let (_, credentials) = tokio::sync::watch::channel(None);
        let tls = Arc::new(TlsContext::new(credentials, Arc::default()));
        let c = UpstreamCluster::new(Arc::new(config), tls, Counter::default(), 1);
        let addrs: Vec<(SocketAddr, u32)> = endpoints
            .iter()
            .map(|(port, w)| (SocketAddr::from(([10, 0, 0, 1], *port)), *w))
            .collect();
        c.set_endpoints(&addrs);
        c
    }

    /// How often each port is picked in `n` picks.
    fn picks(
        c: &UpstreamCluster,
        n: usize,
        hash: impl Fn(usize) -> Option<u64>,
    ) -> HashMap<u16, usize> {
        let mut counts = HashMap::new();
        for i in 0..n {
            let e = c.pick(&[], hash(i), None).unwrap();
            *counts.entry(e.addr.port()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_the_weights_exactly() {
        let c = cluster(Lb::RoundRobin, &[(1, 1), (2, 3)]);
        let counts = picks(&c, 400, |_| None);
        assert_eq!((counts[&1], counts[&2]), (100, 300));
    }

    #[test]
    fn random_spreads_evenly() {
        let c = cluster(Lb::Random, &[(1, 1), (2, 1), (3, 1)]);
        let counts = picks(&c, 3000, |_| None);
        for port in [1, 2, 3] {
            assert!((800..1200).contains(&counts[&port]), "{counts:?}");
        }
    }

    #[test]
    fn least_request_prefers_the_endpoint_with_fewer_in_flight() {
        let c = cluster(Lb::LeastRequest, &[(1, 1), (2, 1)]);
        let busy = c.endpoints()[0].clone();
        let _held: Vec<InFlight> = (0..5).map(|_| busy.in_flight()).collect();
        let counts = picks(&c, 1000, |_| None);
        // Two random choices: the busy one only when both fall on it.
        let on_busy = counts.get(&1).copied().unwrap_or(0);
        assert!((150..350).contains(&on_busy), "{counts:?}");
    }

    #[test]
    fn ring_hash_keeps_each_key_and_moves_only_a_gone_endpoints_keys() {
        let ring = |ports: &[u16]| {
            let endpoints: Vec<_> = ports.iter().map(|p| endpoint(*p, 1)).collect();
            Ring::new(&endpoints, 1024)
        };
        let keys: Vec<u64> = (0..2000).map(|_| fastrand::u64(..)).collect();
        let owner = |r: &Ring, k: u64| r.pick(k, |_| true).unwrap().addr.port();
        let four = ring(&[1, 2, 3, 4]);
        let before: Vec<u16> = keys.iter().map(|k| owner(&four, *k)).collect();
        assert_eq!(
            before,
            keys.iter().map(|k| owner(&four, *k)).collect::<Vec<_>>()
        );
        for port in 1..=4 {
            let share = before.iter().filter(|p| **p == port).count();
            assert!((300..700).contains(&share), "port {port}: {share} of 2000");
        }
        // Without endpoint 3, each remaining one gets more points (the
        // ring keeps its size), as in Envoy, so a few of their keys move
        // too; most stay, where a modulo hash would move three in four.
        let three = ring(&[1, 2, 4]);
        let kept: Vec<bool> = keys
            .iter()
            .zip(&before)
            .filter(|(_, was)| **was != 3)
            .map(|(k, was)| owner(&three, *k) == *was)
            .collect();
        let stayed = kept.iter().filter(|s| **s).count();
        assert!(
            stayed * 100 >= kept.len() * 70,
            "{stayed} of {} stayed",
            kept.len()
        );
    }

    #[test]
    fn the_ring_has_at_least_its_minimum_size_shared_by_weight() {
        let endpoints = [endpoint(1, 1), endpoint(2, 3)];
        let ring = Ring::new(&endpoints, 5000);
        assert!(ring.points.len() >= 5000, "{}", ring.points.len());
        let heavy = ring
            .points
            .iter()
            .filter(|(_, e)| e.addr.port() == 2)
            .count();
        assert_eq!(heavy * 4, ring.points.len() * 3);
        assert_eq!(Ring::new(&endpoints, 1).points.len(), 4);
    }

    #[test]
    fn a_ring_hash_cluster_skips_ejected_endpoints_for_the_next_on_the_ring() {
        let c = cluster(
            Lb::RingHash {
                minimum_ring_size: 1024,
            },
            &[(1, 1), (2, 1), (3, 1)],
        );
        let key = 42;
        let first = c.pick(&[], Some(key), None).unwrap();
        let again = c.pick(&[], Some(key), None).unwrap();
        assert_eq!(first.addr, again.addr);
        let other = c.pick(&[first.addr], Some(key), None).unwrap();
        assert_ne!(other.addr, first.addr);
    }

    #[test]
    fn an_ejection_ends_at_the_first_sweep_after_it_has_lasted() {
        let created = Instant::now();
        let now = created + Duration::from_secs(3);
        let s = Duration::from_secs;
        // Lasts 1 s, to 4 s; sweeps every 10 s: back at 10 s.
        assert_eq!(ejection_end(created, now, s(1), s(10)), created + s(10));
        // Lasts 30 s, to 33 s: back at 40 s.
        assert_eq!(ejection_end(created, now, s(30), s(10)), created + s(40));
        // On a sweep exactly.
        assert_eq!(ejection_end(created, now, s(7), s(10)), created + s(10));
    }

    #[tokio::test]
    async fn a_request_cancelled_in_flight_is_no_longer_counted() {
        let endpoint = Arc::new(Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 9)), 1));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let held = endpoint.clone();
        let request = tokio::spawn(async move {
            let _in_flight = held.in_flight();
            let _ = started_tx.send(());
            std::future::pending::<()>().await
        });
        started.await.unwrap();
        assert_eq!(endpoint.active(), 1);
        request.abort();
        let _ = request.await;
        assert_eq!(endpoint.active(), 0);
    }
}
