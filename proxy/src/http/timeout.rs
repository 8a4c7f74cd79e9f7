//! The timeout stage: ends an attempt at the route's [`Deadline`] or the
//! retry policy's per-try timeout, whichever is first, as a
//! [`Failure::TimedOut`] (which the retry stage may try again). The
//! balancer below counts an attempt ended this way against its endpoint,
//! by the [`Expires`] this stage passes down.

use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Failure, Request, Stage, forward::Deadline, route::Routed};

/// When this attempt is ended.
#[derive(Debug, Clone, Copy)]
pub struct Expires(pub Instant);

#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
}

pub fn layer<S>() -> impl Layer<S, Service = Timeout<S>> + Clone {
    tower::layer::layer_fn(|inner| Timeout { inner })
}

impl<S: Stage<Failure>> Service<Request> for Timeout<S> {
    super::stage_service!(Failure);

    fn call(&mut self, mut request: Request) -> Self::Future {
        let extensions = request.extensions();
        let deadline = extensions.get::<Deadline>().map(|d| d.0);
        let per_try = extensions
            .get::<Routed>()
            .and_then(|r| r.forward()?.retry.as_ref()?.per_try_timeout)
            .map(|t| Instant::now() + t);
        let Some(until) = per_try.into_iter().chain(deadline).min() else {
            return self.inner.call(request);
        };
        request.extensions_mut().insert(Expires(until));
        let attempt = self.inner.call(request);
        Box::pin(async move {
            tokio::time::timeout_at(until, attempt)
                .await
                .unwrap_or(Err(Failure::TimedOut))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::{
        envoy::config::route::v3 as xds, google::protobuf::Duration as XdsDuration,
    };
    use tower::{ServiceExt, util::BoxCloneService};

    use super::*;
    use crate::http::Response;
    use crate::http::{
        full,
        test_support::{request, route_to, routed},
    };

    /// An upstream that answers after 10 s, telling when its attempt
    /// expires.
    fn slow() -> BoxCloneService<Request, Response, Failure> {
        BoxCloneService::new(tower::service_fn(|request: Request| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let mut response = http::Response::new(full("late"));
            if let Some(expires) = request.extensions().get::<Expires>() {
                response.extensions_mut().insert(*expires);
            }
            Ok(response)
        }))
    }

    fn with_per_try(per_try_ms: Option<u64>) -> Request {
        let route = route_to("a", |a| {
            a.retry_policy = per_try_ms.map(|ms| xds::RetryPolicy {
                retry_on: "5xx".into(),
                per_try_timeout: Some(XdsDuration {
                    seconds: (ms / 1000) as i64,
                    nanos: (ms % 1000 * 1_000_000) as i32,
                }),
                ..Default::default()
            });
        });
        routed(request("http://ratings/"), route)
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_ends_at_the_deadline_or_its_per_try_timeout_whichever_is_first() {
        for (per_try, deadline, ends) in [
            (None, 1000, 1000),
            (Some(200), 1000, 200),
            (Some(900), 300, 300),
        ] {
            let started = Instant::now();
            let mut request = with_per_try(per_try);
            let at = started + Duration::from_millis(deadline);
            request.extensions_mut().insert(Deadline(at));
            let outcome = layer().layer(slow()).oneshot(request).await;
            assert_eq!(outcome.unwrap_err(), Failure::TimedOut);
            assert_eq!(started.elapsed(), Duration::from_millis(ends));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn without_either_an_attempt_takes_as_long_as_it_takes() {
        let started = Instant::now();
        let response = layer()
            .layer(slow())
            .oneshot(with_per_try(None))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(response.extensions().get::<Expires>().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_stages_below_are_told_when_the_attempt_expires() {
        let started = Instant::now();
        let mut request = with_per_try(Some(15_000));
        request
            .extensions_mut()
            .insert(Deadline(started + Duration::from_secs(30)));
        let response = layer().layer(slow()).oneshot(request).await.unwrap();
        let expires = response.extensions().get::<Expires>().unwrap();
        assert_eq!(expires.0, started + Duration::from_secs(15));
    }
}
