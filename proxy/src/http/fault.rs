//! The fault stage (when the chain has Envoy's fault filter): delays a
//! share of the route's requests, and aborts a share with the route's
//! status, as Istio's fault injection asks.

use tower::{Layer, Service};

use super::{Request, Stage, filters::aborted, route::Routed};

#[derive(Clone)]
pub struct Fault<S> {
    on: bool,
    inner: S,
}

/// Faults when `on`; otherwise requests pass as they are.
pub fn layer<S>(on: bool) -> impl Layer<S, Service = Fault<S>> + Clone {
    tower::layer::layer_fn(move |inner| Fault { on, inner })
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for Fault<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, request: Request) -> Self::Future {
        let fault = match request.extensions().get::<Routed>() {
            Some(routed) if self.on => routed.route().fault.as_ref().map(|f| (f.delay, f.abort)),
            _ => None,
        };
        let Some((delay, abort)) = fault else {
            return self.inner.call(request);
        };
        let delay = delay.filter(|(_, share)| share.roll()).map(|(d, _)| d);
        let abort = abort.filter(|(_, share)| share.roll()).map(|(a, _)| a);
        if delay.is_none() {
            return match abort {
                Some(abort) => super::reply(aborted(abort)),
                None => self.inner.call(request),
            };
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            match abort {
                Some(abort) => Ok(aborted(abort)),
                None => inner.call(request).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::{
        extensions::filters::{
            common::fault::v3::{FaultDelay, fault_delay::FaultDelaySecifier},
            http::fault::v3::{FaultAbort, HttpFault, fault_abort::ErrorType},
        },
        r#type::v3::FractionalPercent,
    };
    use tokio::time::Instant;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        config::route::FAULT_FILTER,
        http::test_support::{Recorder, per_filter, request, route_to, routed},
    };

    fn percent(numerator: u32) -> Option<FractionalPercent> {
        Some(FractionalPercent {
            numerator,
            denominator: 0,
        })
    }

    fn faulty(fault: HttpFault) -> Request {
        let mut route = route_to("c", |_| {});
        per_filter(&mut route, FAULT_FILTER, fault);
        routed(request("http://ratings/"), route)
    }

    fn abort(share: u32) -> HttpFault {
        HttpFault {
            abort: Some(FaultAbort {
                error_type: Some(ErrorType::HttpStatus(418)),
                percentage: percent(share),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_for_its_time() {
        let app = Recorder::default();
        let fault = layer(true).layer(app.answering("app"));
        let delay = HttpFault {
            delay: Some(FaultDelay {
                fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(
                    envoy_types::pb::google::protobuf::Duration {
                        seconds: 7,
                        nanos: 0,
                    },
                )),
                percentage: percent(100),
            }),
            ..Default::default()
        };
        let started = Instant::now();
        let response = fault.oneshot(faulty(delay)).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(started.elapsed(), Duration::from_secs(7));
        assert_eq!(app.count(), 1);
    }

    #[tokio::test]
    async fn an_abort_answers_its_share_with_its_status() {
        let app = Recorder::default();
        let fault = layer(true).layer(app.answering("app"));
        let response = fault.clone().oneshot(faulty(abort(100))).await.unwrap();
        assert_eq!(response.status().as_u16(), 418);
        assert_eq!(app.count(), 0);
        let response = fault.oneshot(faulty(abort(0))).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(app.count(), 1);
    }

    #[tokio::test]
    async fn without_the_filter_faults_are_not_injected() {
        let app = Recorder::default();
        let off = layer(false).layer(app.answering("app"));
        let response = off.oneshot(faulty(abort(100))).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
    }
}
