//! The forward stage: does what the route says. A redirect or a direct
//! answer is replied here. A forward picks the weighted cluster, applies
//! the route's and the cluster's header operations, the path and host
//! rewrites and the headers a forwarded request carries, and passes down
//! what the stages below need: the [`Target`] cluster, the ring-hash
//! [`HashKey`], the route's [`Deadline`], and the body kept whole
//! ([`Replayable`]) when a retry or a mirror may send it again. Whatever
//! failure comes back becomes the local reply that says why; each request
//! is counted per cluster and code, and timed.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::{
    Connection, Failure, Request, Response, ResponseFuture, Stage,
    filters::{apply_request_ops, apply_response_ops, forwarded_headers, redirect},
    full,
    route::Routed,
};
use crate::{
    config::route::{Action, RequestParts},
    stats::{RequestLabels, Stats},
    upstream::{UpstreamCluster, Upstreams},
};

/// Request bodies up to this size are kept for retries and mirrors;
/// larger ones stream through once.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// The cluster a request goes to.
#[derive(Clone)]
pub struct Target(pub Arc<UpstreamCluster>);

/// The key that picks a ring-hash cluster's endpoint.
#[derive(Debug, Clone, Copy)]
pub struct HashKey(pub u64);

/// When the route's timeout ends the request, retries included.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);

/// The request's body, kept whole to be sent again.
#[derive(Debug, Clone)]
pub struct Replayable(pub Bytes);

/// What forwarding needs of the connection and the proxy.
pub struct Forwarding {
    pub upstreams: Arc<Upstreams>,
    pub connection: Arc<Connection>,
    /// As metrics label it.
    pub direction: &'static str,
    /// Mixer's attributes of this workload, sent with outbound requests.
    pub attributes: Option<HeaderValue>,
}

#[derive(Clone)]
pub struct Forward<S> {
    forwarding: Arc<Forwarding>,
    inner: S,
}

pub fn layer<S>(forwarding: Forwarding) -> impl Layer<S, Service = Forward<S>> + Clone {
    let forwarding = Arc::new(forwarding);
    tower::layer::layer_fn(move |inner| Forward {
        forwarding: forwarding.clone(),
        inner,
    })
}

impl<S: Stage<Failure>> Service<Request> for Forward<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, request: Request) -> Self::Future {
        let Some(routed) = request.extensions().get::<Routed>().cloned() else {
            return super::answer(StatusCode::NOT_FOUND, "no route");
        };
        match &routed.route().action {
            Action::Redirect { host, path, code } => {
                let parts = RequestParts::of(&request);
                super::reply(redirect(host, path, *code, parts.authority, parts.path))
            }
            Action::Direct { status, body } => {
                let mut r = http::Response::new(full(body.clone()));
                *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                super::reply(r)
            }
            Action::Forward(_) => self.forward(request, routed),
        }
    }
}

impl<S: Stage<Failure>> Forward<S> {
    fn forward(
        &mut self,
        request: Request,
        routed: Routed,
    ) -> ResponseFuture<std::convert::Infallible> {
        let Some(forward) = routed.forward() else {
            return super::answer(StatusCode::NOT_FOUND, "no route");
        };
        let picked = forward.pick();
        let name = &forward.clusters[picked].name;
        let Some(cluster) = self.forwarding.upstreams.get(name) else {
            return super::reply(Failure::NoCluster(name.clone()).reply());
        };
        let route = routed.route();
        let (mut parts, body) = request.into_parts();
        apply_request_ops(&route.headers, &mut parts.headers);
        apply_request_ops(&forward.clusters[picked].headers, &mut parts.headers);
        let connection = &self.forwarding.connection;
        forwarded_headers(
            &mut parts,
            forward.host_rewrite.as_deref(),
            self.forwarding.attributes.as_ref(),
            connection.peer_identity.as_deref(),
        );
        let original = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let path = route.rewrite(original, forward.prefix_rewrite.as_deref());
        match path.parse() {
            Ok(uri) => parts.uri = uri,
            Err(e) => {
                return super::reply(Failure::BadRequest(format!("path {path:?}: {e}")).reply());
            }
        }
        let hashed = forward.hash.hash(&parts.headers, connection.peer.ip());
        if let Some(hashed) = &hashed {
            parts.extensions.insert(HashKey(hashed.key));
        }
        if let Some(timeout) = forward.timeout {
            let at = tokio::time::Instant::now() + timeout;
            parts.extensions.insert(Deadline(at));
        }
        parts.extensions.insert(Target(cluster));
        let replay =
            forward.retry.as_ref().is_some_and(|r| r.attempts > 0) || !forward.mirrors.is_empty();
        let small = http_body::Body::size_hint(&body)
            .upper()
            .is_some_and(|n| n <= REPLAY_LIMIT);
        let mut inner = self.inner.clone();
        let forwarding = self.forwarding.clone();
        let set_cookie = hashed.and_then(|h| h.set_cookie);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let request = if replay && small {
                match body.collect().await {
                    Ok(collected) => {
                        let bytes = collected.to_bytes();
                        parts.extensions.insert(Replayable(bytes.clone()));
                        Request::from_parts(parts, full(bytes))
                    }
                    Err(e) => {
                        let why = format!("request body: {e}");
                        return Ok(Failure::BadRequest(why).reply());
                    }
                }
            } else {
                Request::from_parts(parts, body)
            };
            let mut response = inner.call(request).await.unwrap_or_else(|f| f.reply());
            if let Some(cookie) = set_cookie {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            if let Some(weighted) = routed.forward().map(|f| &f.clusters[picked]) {
                apply_response_ops(&weighted.headers, response.headers_mut());
                count(&forwarding, &weighted.name, &response, started);
            }
            Ok(response)
        })
    }
}

fn count(forwarding: &Forwarding, cluster: &str, response: &Response, started: std::time::Instant) {
    let stats = &forwarding.upstreams.stats;
    stats
        .requests
        .get_or_create(&RequestLabels {
            direction: forwarding.direction,
            cluster: cluster.to_string(),
            response_code: response.status().as_u16(),
        })
        .inc();
    stats
        .request_duration
        .get_or_create(&Stats::cluster(cluster))
        .observe(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use envoy_types::pb::{
        envoy::config::{
            core::v3::{HeaderValue as XdsHeader, HeaderValueOption},
            route::v3::{
                self as xds, RedirectAction, route_action::HostRewriteSpecifier,
                weighted_cluster::ClusterWeight,
            },
        },
        google::protobuf::{Duration as XdsDuration, UInt32Value},
    };
    use tower::{ServiceExt, util::BoxCloneService};

    use super::*;
    use crate::{
        http::test_support::{Recorder, request, route_to, routed, text},
        upstream::testing,
    };

    async fn forwarding(direction: &'static str) -> Forwarding {
        let clusters = ["a", "b"].map(|n| testing::cluster(n, &[])).to_vec();
        Forwarding {
            upstreams: testing::upstreams(clusters).await,
            connection: Arc::new(Connection {
                peer: "10.0.0.9:40000".parse().unwrap(),
                peer_identity: Some("spiffe://cluster.local/ns/shop/sa/productpage".into()),
                destination: None,
                tls: false,
            }),
            direction,
            attributes: None,
        }
    }

    fn add(name: &str, value: &str) -> Vec<HeaderValueOption> {
        vec![HeaderValueOption {
            header: Some(XdsHeader {
                key: name.into(),
                value: value.into(),
                ..Default::default()
            }),
            ..Default::default()
        }]
    }

    #[tokio::test]
    async fn redirects_and_direct_answers_are_given_here() {
        let app = Recorder::default();
        let stage = layer(forwarding("outbound").await).layer(app.answering::<Failure>("app"));
        let mut redirect = route_to("a", |_| {});
        redirect.action = Some(xds::route::Action::Redirect(RedirectAction {
            host_redirect: "www.example".into(),
            ..Default::default()
        }));
        let response = stage
            .clone()
            .oneshot(routed(request("http://shop/cart?x=1"), redirect))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            response.headers()[header::LOCATION],
            "http://www.example/cart?x=1"
        );

        let mut direct = route_to("a", |_| {});
        direct.action = Some(xds::route::Action::DirectResponse(
            xds::DirectResponseAction {
                status: 418,
                body: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                    specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                            "teapot".into(),
                        ),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ));
        let response = stage
            .oneshot(routed(request("http://shop/"), direct))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 418);
        assert_eq!(text(response).await, "teapot");
        assert_eq!(app.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forward_rewrites_the_request_and_tells_the_stages_below() {
        let app = Recorder::default();
        let stage = layer(forwarding("outbound").await).layer(app.answering::<Failure>("app"));
        let mut route = route_to("a", |a| {
            a.prefix_rewrite = "/v2/".into();
            a.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(
                "ratings.internal".into(),
            ));
            a.timeout = Some(XdsDuration {
                seconds: 3,
                nanos: 0,
            });
            a.retry_policy = Some(xds::RetryPolicy {
                retry_on: "5xx".into(),
                num_retries: Some(UInt32Value { value: 2 }),
                ..Default::default()
            });
        });
        route.request_headers_to_add = add("x-route", "ratings");
        let mut request = routed(request("http://ratings/x?q=1"), route);
        *request.body_mut() = crate::http::full("stars");
        let sent = tokio::time::Instant::now();
        stage.oneshot(request).await.unwrap();

        let seen = app.last();
        assert_eq!(seen.uri, "/v2/x?q=1");
        assert_eq!(seen.headers[header::HOST], "ratings.internal");
        assert_eq!(seen.headers["x-route"], "ratings");
        assert_eq!(
            seen.headers["x-forwarded-client-cert"],
            "URI=spiffe://cluster.local/ns/shop/sa/productpage"
        );
        assert!(seen.headers.contains_key("x-request-id"));
        let target = seen.extensions.get::<Target>().unwrap();
        assert_eq!(target.0.config.name, "a");
        let deadline = seen.extensions.get::<Deadline>().unwrap();
        assert_eq!(deadline.0, sent + Duration::from_secs(3));
        // Kept whole, for a retry.
        assert_eq!(seen.extensions.get::<Replayable>().unwrap().0, "stars");
    }

    #[tokio::test]
    async fn weighted_clusters_get_their_share_and_their_own_header_operations() {
        let app = Recorder::default();
        let stage = layer(forwarding("outbound").await).layer(app.answering::<Failure>("app"));
        let weighted = |name: &str, weight| ClusterWeight {
            name: name.into(),
            weight: Some(UInt32Value { value: weight }),
            response_headers_to_add: add("x-cluster", name),
            ..Default::default()
        };
        let route = route_to("a", |a| {
            a.cluster_specifier = Some(xds::route_action::ClusterSpecifier::WeightedClusters(
                xds::WeightedCluster {
                    clusters: vec![weighted("a", 1), weighted("b", 3)],
                    ..Default::default()
                },
            ));
        });
        let mut counts = HashMap::new();
        for _ in 0..400 {
            let request = routed(request("http://ratings/"), route.clone());
            let response = stage.clone().oneshot(request).await.unwrap();
            let target = app.last().extensions.get::<Target>().unwrap().0.clone();
            assert_eq!(response.headers()["x-cluster"], target.config.name.as_str());
            *counts.entry(target.config.name.clone()).or_insert(0) += 1;
        }
        assert!((50..150).contains(&counts["a"]), "{counts:?}");
    }

    #[tokio::test]
    async fn a_failure_below_is_answered_saying_why_and_counted() {
        let forwarding = forwarding("inbound").await;
        let stats = forwarding.upstreams.stats.clone();
        let timed_out = BoxCloneService::new(tower::service_fn(|_: Request| async {
            Err::<Response, _>(Failure::TimedOut)
        }));
        let stage = layer(forwarding).layer(timed_out);
        let response = stage
            .clone()
            .oneshot(routed(request("http://ratings/"), route_to("a", |_| {})))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(text(response).await, "upstream request timeout\n");
        let counted = stats
            .requests
            .get_or_create(&RequestLabels {
                direction: "inbound",
                cluster: "a".into(),
                response_code: 504,
            })
            .get();
        assert_eq!(counted, 1);

        let response = stage
            .oneshot(routed(request("http://ratings/"), route_to("nope", |_| {})))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(text(response).await, "cluster nope not found\n");
    }

    #[tokio::test]
    async fn a_hashed_request_carries_its_key_and_gets_the_cookie_made_for_it() {
        let app = Recorder::default();
        let stage = layer(forwarding("outbound").await).layer(app.answering::<Failure>("app"));
        let route = route_to("a", |a| {
            use xds::route_action::hash_policy::{Cookie, PolicySpecifier};
            a.hash_policy = vec![xds::route_action::HashPolicy {
                policy_specifier: Some(PolicySpecifier::Cookie(Cookie {
                    name: "session".into(),
                    ttl: Some(XdsDuration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            }];
        });
        let response = stage
            .oneshot(routed(request("http://shop/"), route))
            .await
            .unwrap();
        let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(cookie.starts_with("session="), "{cookie}");
        assert!(app.last().extensions.get::<HashKey>().is_some());
    }
}
