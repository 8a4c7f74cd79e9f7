//! The retry stage: sends a request again, as the route's retry policy
//! says, when its body was kept whole and the failure or the answer is one
//! the policy names. A retry needs a place in the cluster's circuit
//! breaker for retries; it waits Envoy's jittered back-off (25 ms base)
//! first, and never goes past the route's [`Deadline`].

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tower::{Layer, Service};

use super::{
    Failure, Request, Response, Stage,
    balance::Tried,
    forward::{Deadline, Replayable, Target},
    full,
    route::Routed,
};
use crate::{config::route::RetryPolicy, stats::Stats, upstream::UpstreamCluster};

#[derive(Clone)]
pub struct Retry<S> {
    stats: Stats,
    inner: S,
}

pub fn layer<S>(stats: Stats) -> impl Layer<S, Service = Retry<S>> + Clone {
    tower::layer::layer_fn(move |inner| Retry {
        stats: stats.clone(),
        inner,
    })
}

impl<S: Stage<Failure>> Service<Request> for Retry<S> {
    super::stage_service!(Failure);

    fn call(&mut self, request: Request) -> Self::Future {
        let extensions = request.extensions();
        let plan = || {
            let policy = extensions.get::<Routed>()?.forward()?.retry.as_ref()?;
            Some((
                policy.clone(),
                extensions.get::<Replayable>()?.0.clone(),
                extensions.get::<Target>()?.0.clone(),
            ))
        };
        match plan() {
            Some((policy, body, cluster)) if policy.attempts > 0 => {
                let retrying = Retrying {
                    policy,
                    body,
                    cluster,
                    stats: self.stats.clone(),
                };
                Box::pin(retrying.send(self.inner.clone(), request))
            }
            // A streamed body can be sent once only.
            _ => self.inner.call(request),
        }
    }
}

/// A request the policy may send again.
struct Retrying {
    policy: RetryPolicy,
    body: Bytes,
    cluster: Arc<UpstreamCluster>,
    stats: Stats,
}

impl Retrying {
    async fn send<S: Stage<Failure>>(
        self,
        mut inner: S,
        request: Request,
    ) -> Result<Response, Failure> {
        let Self {
            policy,
            body,
            cluster,
            stats,
        } = self;
        let (mut parts, _) = request.into_parts();
        let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
        if policy.other_hosts {
            parts.extensions.insert(Tried::default());
        }
        let mut attempts = 0;
        let mut place = None;
        loop {
            let attempt = http::Request::from_parts(parts.clone(), full(body.clone()));
            let outcome = inner.call(attempt).await;
            attempts += 1;
            // The retry just made, if it was one, is over.
            drop(place.take());
            if attempts <= policy.attempts && retriable(&policy, &outcome) {
                place = cluster.start_retry();
            }
            let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if place.is_none() || expired {
                return outcome;
            }
            stats
                .retries
                .get_or_create(&Stats::cluster(&cluster.config.name))
                .inc();
            let back_off = tokio::time::Instant::now()
                + Duration::from_millis(fastrand::u64(0..25 * u64::from(attempts)));
            let until = deadline.map_or(back_off, |d| d.min(back_off));
            tokio::time::sleep_until(until).await;
            if deadline.is_some_and(|d| until >= d) {
                return Err(Failure::TimedOut);
            }
        }
    }
}

/// Whether the policy retries this outcome.
fn retriable(policy: &RetryPolicy, outcome: &Result<Response, Failure>) -> bool {
    match outcome {
        Err(Failure::ConnectFailed(_)) => {
            policy.on_connect_failure || policy.on_5xx || policy.on_gateway_error
        }
        Err(Failure::Reset(_)) => policy.on_reset || policy.on_5xx || policy.on_refused_stream,
        Err(Failure::TimedOut) => policy.on_5xx || policy.on_gateway_error,
        Err(_) => false,
        Ok(r) => {
            let code = r.status().as_u16();
            let grpc = r
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            (policy.on_5xx && code >= 500)
                || (policy.on_gateway_error && matches!(code, 502..=504))
                || policy.status_codes.contains(&code)
                || grpc.is_some_and(|g| policy.grpc_statuses.contains(&g))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use envoy_types::pb::{envoy::config::route::v3 as xds, google::protobuf::UInt32Value};
    use tokio::time::Instant;
    use tower::{ServiceExt, util::BoxCloneService};

    use super::*;
    use crate::{
        config::cluster::Limits,
        http::test_support::{request, route_to, routed},
        upstream::{Upstreams, testing},
    };

    /// An upstream that fails the first `failing` attempts with `failure`
    /// (or a 503), then answers 200; and how many it was sent.
    fn upstream(
        failing: u32,
        failure: Option<Failure>,
    ) -> (BoxCloneService<Request, Response, Failure>, Arc<AtomicU32>) {
        let sent = Arc::new(AtomicU32::new(0));
        let counted = sent.clone();
        let service = tower::service_fn(move |_: Request| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let failure = failure.clone();
            async move {
                if n >= failing {
                    return Ok(http::Response::new(full("ok")));
                }
                match failure {
                    Some(f) => Err(f),
                    None => {
                        let mut r = http::Response::new(full("busy"));
                        *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        Ok(r)
                    }
                }
            }
        });
        (BoxCloneService::new(service), sent)
    }

    async fn cluster(max_retries: u32) -> Arc<Upstreams> {
        let mut config = testing::cluster("a", &[]);
        config.limits = Limits {
            max_retries,
            ..Limits::default()
        };
        testing::upstreams(vec![config]).await
    }

    /// A kept request on a route retrying `retry_on` `retries` times.
    fn retried(upstreams: &Upstreams, retry_on: &str, retries: u32, kept: bool) -> Request {
        let route = route_to("a", |a| {
            a.retry_policy = Some(xds::RetryPolicy {
                retry_on: retry_on.into(),
                num_retries: Some(UInt32Value { value: retries }),
                ..Default::default()
            });
        });
        let mut request = routed(request("http://ratings/"), route);
        request
            .extensions_mut()
            .insert(Target(upstreams.get("a").unwrap()));
        if kept {
            request
                .extensions_mut()
                .insert(Replayable(Bytes::from("stars")));
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_policy_names_is_tried_again_and_counted() {
        let upstreams = cluster(3).await;
        let (app, sent) = upstream(2, None);
        let retry = layer(upstreams.stats.clone()).layer(app);
        let response = retry
            .oneshot(retried(&upstreams, "5xx", 3, true))
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        let retries = upstreams.stats.retries.get_or_create(&Stats::cluster("a"));
        assert_eq!(retries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_run_out_and_the_last_answer_stands() {
        let upstreams = cluster(3).await;
        let (app, sent) = upstream(u32::MAX, None);
        let retry = layer(upstreams.stats.clone()).layer(app);
        let response = retry
            .oneshot(retried(&upstreams, "5xx", 2, true))
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(sent.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_policy_does_not_name_is_not_retried() {
        let upstreams = cluster(3).await;
        let (app, sent) = upstream(1, Some(Failure::Reset("gone".into())));
        let retry = layer(upstreams.stats.clone()).layer(app);
        let outcome = retry
            .oneshot(retried(&upstreams, "connect-failure", 2, true))
            .await;
        assert_eq!(outcome.unwrap_err(), Failure::Reset("gone".into()));
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_or_a_full_retry_budget_means_one_attempt() {
        let upstreams = cluster(3).await;
        let (app, sent) = upstream(1, None);
        let retry = layer(upstreams.stats.clone()).layer(app);
        retry
            .oneshot(retried(&upstreams, "5xx", 2, false))
            .await
            .unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 1);

        let budgetless = cluster(0).await;
        let (app, sent) = upstream(1, None);
        let retry = layer(budgetless.stats.clone()).layer(app);
        retry
            .oneshot(retried(&budgetless, "5xx", 2, true))
            .await
            .unwrap();
        assert_eq!(sent.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retrying_stops_at_the_routes_deadline() {
        let upstreams = cluster(1000).await;
        let failure = Failure::ConnectFailed("refused".into());
        let (app, sent) = upstream(u32::MAX, Some(failure));
        let retry = layer(upstreams.stats.clone()).layer(app);
        let mut request = retried(&upstreams, "connect-failure", 1000, true);
        let deadline = Instant::now() + Duration::from_millis(200);
        request.extensions_mut().insert(Deadline(deadline));
        let outcome = retry.oneshot(request).await;
        assert!(outcome.is_err());
        assert!(Instant::now() <= deadline);
        let sent = sent.load(Ordering::SeqCst);
        assert!((2..1000).contains(&sent), "{sent} attempts");
    }
}
