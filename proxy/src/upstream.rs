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

impl tower_service::Service<http::Uri> for Connector {
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
            (Lb::RingHash, Some(h)) => ring_pick(&candidates, h),
            (Lb::Random, _) | (Lb::RingHash, None) => {
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
        *endpoint
            .ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(now + outlier.base_ejection_time * times);
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

/// Consistent hashing: the endpoint whose point on the ring (a hash of its
/// address) follows the request's hash, so a key keeps its endpoint while
/// the set stays the same, and most keys keep theirs when it changes.
fn ring_pick<'a>(candidates: &[&'a Arc<Endpoint>], hash: u64) -> &'a Arc<Endpoint> {
    use std::hash::{Hash, Hasher};
    // A few points per endpoint spread the keys evenly.
    const POINTS: u64 = 64;
    let mut best: Option<(u64, &Arc<Endpoint>)> = None;
    let mut lowest: Option<(u64, &Arc<Endpoint>)> = None;
    for e in candidates {
        for point in 0..POINTS {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (e.addr, point).hash(&mut h);
            let p = h.finish();
            if p >= hash && best.is_none_or(|(b, _)| p < b) {
                best = Some((p, e));
            }
            if lowest.is_none_or(|(l, _)| p < l) {
                lowest = Some((p, e));
            }
        }
    }
    best.or(lowest).map(|(_, e)| e).unwrap_or(candidates[0])
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
mod tests {
    use super::*;

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
