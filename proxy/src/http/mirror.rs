//! The mirror stage: sends a copy of a request whose body was kept whole
//! to each of the route's mirror clusters, with its host marked
//! `-shadow`, and forgets it: a mirror's answer is not the caller's. The
//! copy goes through the stages below (to a balancer and a connection) as
//! a request of its own, without the route's retries or deadline.

use std::sync::Arc;

use tower::{Layer, Service};

use super::{
    Failure, Request, Stage,
    filters::shadow,
    forward::{Replayable, Target},
    full,
    route::Routed,
};
use crate::upstream::Upstreams;

#[derive(Clone)]
pub struct Mirror<S> {
    upstreams: Arc<Upstreams>,
    inner: S,
}

pub fn layer<S>(upstreams: Arc<Upstreams>) -> impl Layer<S, Service = Mirror<S>> + Clone {
    tower::layer::layer_fn(move |inner| Mirror {
        upstreams: upstreams.clone(),
        inner,
    })
}

impl<S: Stage<Failure>> Service<Request> for Mirror<S> {
    super::stage_service!(Failure);

    fn call(&mut self, request: Request) -> Self::Future {
        let extensions = request.extensions();
        if let (Some(routed), Some(Replayable(body))) =
            (extensions.get::<Routed>(), extensions.get::<Replayable>())
        {
            let mirrors = routed.forward().map_or(&[][..], |f| &f.mirrors[..]);
            for name in mirrors {
                let Some(cluster) = self.upstreams.get(name) else {
                    tracing::debug!(cluster = %name, "mirror cluster not found");
                    continue;
                };
                let mut copy = http::Request::new(full(body.clone()));
                *copy.method_mut() = request.method().clone();
                *copy.uri_mut() = request.uri().clone();
                *copy.headers_mut() = request.headers().clone();
                shadow(copy.headers_mut());
                copy.extensions_mut().insert(Target(cluster));
                let sent = self.inner.call(copy);
                tokio::spawn(async move {
                    if let Err(failure) = sent.await {
                        tracing::debug!(?failure, "mirrored request failed");
                    }
                });
            }
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::route::v3::route_action::RequestMirrorPolicy;
    use http::header;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        http::test_support::{Recorder, request, route_to, routed},
        upstream::testing,
    };

    async fn mirrored(kept: bool) -> Recorder {
        let clusters = ["a", "shadow"].map(|n| testing::cluster(n, &[])).to_vec();
        let upstreams = testing::upstreams(clusters).await;
        let route = route_to("a", |a| {
            a.request_mirror_policies = vec![RequestMirrorPolicy {
                cluster: "shadow".into(),
                ..Default::default()
            }];
        });
        let mut request = routed(request("/ratings"), route);
        request
            .headers_mut()
            .insert(header::HOST, "ratings:9080".parse().unwrap());
        request
            .extensions_mut()
            .insert(Target(upstreams.get("a").unwrap()));
        if kept {
            request
                .extensions_mut()
                .insert(Replayable(bytes::Bytes::from("stars")));
        }
        let app = Recorder::default();
        let stage = layer(upstreams).layer(app.answering::<Failure>("app"));
        stage.oneshot(request).await.unwrap();
        // The copy is sent by a task of its own.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        app
    }

    #[tokio::test]
    async fn a_kept_request_is_copied_to_the_mirror_as_a_shadow() {
        let app = mirrored(true).await;
        let seen = app.seen.lock().unwrap();
        let hosts: Vec<(&str, &str)> = seen
            .iter()
            .map(|p| {
                let cluster = &p.extensions.get::<Target>().unwrap().0.config.name;
                (cluster.as_str(), p.headers[header::HOST].to_str().unwrap())
            })
            .collect();
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert!(hosts.contains(&("a", "ratings:9080")), "{hosts:?}");
        assert!(
            hosts.contains(&("shadow", "ratings:9080-shadow")),
            "{hosts:?}"
        );
        // The copy has no route: neither retried nor timed by it.
        let copy = seen.iter().find(|p| p.extensions.get::<Routed>().is_none());
        assert!(copy.is_some());
    }

    #[tokio::test]
    async fn a_streamed_request_is_not_mirrored() {
        assert_eq!(mirrored(false).await.count(), 1);
    }
}
