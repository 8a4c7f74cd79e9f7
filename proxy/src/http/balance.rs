//! The balance stage: takes a place in the target cluster's circuit
//! breaker, picks an endpoint by the cluster's load balancer (by the
//! request's [`HashKey`] for ring hash, avoiding what was [`Tried`] when
//! the retry policy asks), and counts the attempt in flight on it until
//! it ends, however it ends. Each attempt's outcome feeds outlier
//! detection: a 5xx or a failure counts against the endpoint, and so does
//! an attempt the timeout stage ended.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tower::{Layer, Service};

use super::{
    Failure, Request, Stage,
    forward::{HashKey, Target},
    timeout::Expires,
};
use crate::upstream::{Endpoint, InFlight, UpstreamCluster};

/// The endpoint an attempt goes to, for the connect stage.
#[derive(Debug, Clone, Copy)]
pub struct Picked(pub SocketAddr);

/// The endpoints a request's attempts went to, so far.
#[derive(Debug, Clone, Default)]
pub struct Tried(Arc<Mutex<Vec<SocketAddr>>>);

impl Tried {
    fn list(&self) -> Vec<SocketAddr> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn add(&self, addr: SocketAddr) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(addr);
    }
}

#[derive(Clone)]
pub struct Balance<S> {
    /// Where the connection was going, an original-destination cluster's
    /// one endpoint.
    destination: Option<SocketAddr>,
    inner: S,
}

pub fn layer<S>(destination: Option<SocketAddr>) -> impl Layer<S, Service = Balance<S>> + Clone {
    tower::layer::layer_fn(move |inner| Balance { destination, inner })
}

impl<S: Stage<Failure>> Service<Request> for Balance<S> {
    super::stage_service!(Failure);

    fn call(&mut self, mut request: Request) -> Self::Future {
        let extensions = request.extensions();
        let Some(Target(cluster)) = extensions.get::<Target>().cloned() else {
            return super::fail(Failure::NoCluster(String::new()));
        };
        let hash = extensions.get::<HashKey>().map(|h| h.0);
        let tried = extensions.get::<Tried>().cloned();
        let expires = extensions.get::<Expires>().map(|e| e.0);
        let destination = self.destination;
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let Some(_admitted) = cluster.admit().await else {
                return Err(Failure::Overflow);
            };
            let avoid = tried.as_ref().map(Tried::list).unwrap_or_default();
            let Some(endpoint) = cluster.pick(&avoid, hash, destination) else {
                return Err(Failure::NoHealthyUpstream);
            };
            if let Some(tried) = &tried {
                tried.add(endpoint.addr);
            }
            request.extensions_mut().insert(Picked(endpoint.addr));
            let attempt = Attempt::start(&cluster, endpoint, expires);
            let outcome = inner.call(request).await;
            attempt.end(match &outcome {
                Ok(response) => response.status().is_server_error(),
                Err(_) => true,
            });
            outcome
        })
    }
}

/// An attempt on an endpoint: in flight until it is dropped, and recorded
/// for outlier detection then. One dropped before it ended failed if its
/// time was up; if not, its caller went away, which says nothing of the
/// endpoint.
struct Attempt<'a> {
    cluster: &'a UpstreamCluster,
    endpoint: Arc<Endpoint>,
    _in_flight: InFlight,
    expires: Option<tokio::time::Instant>,
    failed: Option<bool>,
}

impl<'a> Attempt<'a> {
    fn start(
        cluster: &'a UpstreamCluster,
        endpoint: Arc<Endpoint>,
        expires: Option<tokio::time::Instant>,
    ) -> Self {
        Self {
            cluster,
            _in_flight: endpoint.in_flight(),
            endpoint,
            expires,
            failed: None,
        }
    }

    fn end(mut self, failed: bool) {
        self.failed = Some(failed);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let timed_out = || {
            self.expires
                .is_some_and(|e| tokio::time::Instant::now() >= e)
        };
        match self.failed {
            Some(failed) => self.cluster.record(&self.endpoint, failed),
            None if timed_out() => self.cluster.record(&self.endpoint, true),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use tower::{ServiceExt, util::BoxCloneService};

    use super::*;
    use crate::http::Response;
    use crate::{
        config::cluster::{Cluster, Lb, Limits, Outlier},
        http::{full, test_support::request},
        upstream::testing,
    };

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn target(config: Cluster) -> Arc<UpstreamCluster> {
        let name = config.name.clone();
        testing::upstreams(vec![config]).await.get(&name).unwrap()
    }

    fn to(cluster: &Arc<UpstreamCluster>) -> Request {
        let mut request = request("/");
        request.extensions_mut().insert(Target(cluster.clone()));
        request
    }

    /// An upstream answering `status` and telling which endpoint it was.
    fn answering(status: u16) -> BoxCloneService<Request, Response, Failure> {
        BoxCloneService::new(tower::service_fn(move |request: Request| async move {
            let mut response = http::Response::new(full(""));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            let picked = request.extensions().get::<Picked>().copied();
            response
                .extensions_mut()
                .insert(picked.expect("an endpoint"));
            Ok(response)
        }))
    }

    fn pending() -> BoxCloneService<Request, Response, Failure> {
        BoxCloneService::new(tower::service_fn(|_: Request| std::future::pending()))
    }

    fn outlier(consecutive_5xx: u32) -> Option<Outlier> {
        Some(Outlier {
            consecutive_5xx,
            interval: Duration::ZERO,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
        })
    }

    fn ejected(cluster: &UpstreamCluster) -> bool {
        cluster.endpoints()[0].ejected(std::time::Instant::now())
    }

    #[tokio::test]
    async fn an_attempt_is_in_flight_until_it_ends_however_it_ends() {
        let cluster = target(testing::cluster("a", &[addr(1)])).await;
        let balance = layer(None).layer(pending());
        let attempt = tokio::spawn(balance.oneshot(to(&cluster)));
        while cluster.endpoints()[0].active() == 0 {
            tokio::task::yield_now().await;
        }
        attempt.abort();
        let _ = attempt.await;
        assert_eq!(cluster.endpoints()[0].active(), 0);
    }

    #[tokio::test]
    async fn answers_pick_endpoints_by_the_balancer_and_feed_outlier_detection() {
        let config = Cluster {
            lb: Lb::RoundRobin,
            outlier: outlier(2),
            ..testing::cluster("a", &[addr(1), addr(2)])
        };
        let cluster = target(config).await;
        let ok = layer(None).layer(answering(200));
        let mut picked = HashSet::new();
        for _ in 0..4 {
            let response = ok.clone().oneshot(to(&cluster)).await.unwrap();
            picked.insert(response.extensions().get::<Picked>().unwrap().0);
        }
        assert_eq!(picked, HashSet::from([addr(1), addr(2)]));
        assert!(!ejected(&cluster));

        let failing = layer(None).layer(answering(503));
        for _ in 0..4 {
            failing.clone().oneshot(to(&cluster)).await.unwrap();
        }
        assert!(ejected(&cluster), "two 5xx in a row eject");
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_attempt_counts_against_its_endpoint_a_cancelled_one_does_not() {
        let config = Cluster {
            outlier: outlier(1),
            ..testing::cluster("a", &[addr(1)])
        };
        for (expires_in, counted) in [(Some(10), false), (Some(1), true), (None, false)] {
            let cluster = target(config.clone()).await;
            let mut request = to(&cluster);
            if let Some(s) = expires_in {
                let at = tokio::time::Instant::now() + Duration::from_secs(s);
                request.extensions_mut().insert(Expires(at));
            }
            // Dropped after 1 s, as the timeout stage (or a caller that
            // went away) drops it.
            let attempt = layer(None).layer(pending()).oneshot(request);
            let _ = tokio::time::timeout(Duration::from_secs(1), attempt).await;
            assert_eq!(ejected(&cluster), counted, "expiring in {expires_in:?} s");
        }
    }

    #[tokio::test]
    async fn a_full_circuit_breaker_refuses_at_once() {
        let config = Cluster {
            limits: Limits {
                max_connections: 1,
                max_pending_requests: 0,
                ..Limits::default()
            },
            ..testing::cluster("a", &[addr(1)])
        };
        let cluster = target(config).await;
        let held = tokio::spawn(layer(None).layer(pending()).oneshot(to(&cluster)));
        while cluster.endpoints()[0].active() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = layer(None)
            .layer(answering(200))
            .oneshot(to(&cluster))
            .await;
        assert_eq!(refused.unwrap_err(), Failure::Overflow);
        held.abort();
    }

    #[tokio::test]
    async fn a_hash_key_keeps_its_endpoint_and_a_retry_avoids_what_was_tried() {
        let config = Cluster {
            lb: Lb::RingHash {
                minimum_ring_size: 1024,
            },
            ..testing::cluster("a", &[addr(1), addr(2), addr(3)])
        };
        let cluster = target(config).await;
        let balance = layer(None).layer(answering(200));
        let pick = |key: u64, tried: Option<Tried>| {
            let mut request = to(&cluster);
            request.extensions_mut().insert(HashKey(key));
            if let Some(tried) = tried {
                request.extensions_mut().insert(tried);
            }
            let balance = balance.clone();
            async move {
                let response = balance.oneshot(request).await.unwrap();
                response.extensions().get::<Picked>().unwrap().0
            }
        };
        let first = pick(7, None).await;
        for _ in 0..10 {
            assert_eq!(pick(7, None).await, first);
        }
        let tried = Tried::default();
        assert_eq!(pick(7, Some(tried.clone())).await, first);
        assert_ne!(pick(7, Some(tried.clone())).await, first);
        assert_eq!(tried.list().len(), 2);
    }

    #[tokio::test]
    async fn an_original_destination_cluster_goes_where_the_connection_was_going() {
        let config = Cluster {
            discovery: crate::config::cluster::Discovery::OriginalDst,
            ..testing::cluster("passthrough", &[])
        };
        let cluster = target(config).await;
        let balance = layer(Some(addr(8080))).layer(answering(200));
        let response = balance.oneshot(to(&cluster)).await.unwrap();
        assert_eq!(response.extensions().get::<Picked>().unwrap().0, addr(8080));
    }
}
