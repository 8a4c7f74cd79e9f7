//! The CORS stage (when the chain has Envoy's CORS filter): answers a
//! preflight by the route's policy, and marks the responses to an allowed
//! origin.

use http::header;
use tower::{Layer, Service};

use super::{
    Request, Stage,
    filters::{cors_allow, cors_preflight},
    route::Routed,
};

#[derive(Clone)]
pub struct Cors<S> {
    on: bool,
    inner: S,
}

/// CORS when `on`; otherwise requests pass as they are.
pub fn layer<S>(on: bool) -> impl Layer<S, Service = Cors<S>> + Clone {
    tower::layer::layer_fn(move |inner| Cors { on, inner })
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for Cors<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, request: Request) -> Self::Future {
        if !self.on {
            return self.inner.call(request);
        }
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_string);
        let routed = request.extensions().get::<Routed>().cloned();
        let (Some(origin), Some(routed)) = (origin, routed) else {
            return self.inner.call(request);
        };
        let Some(cors) = &routed.route().cors else {
            return self.inner.call(request);
        };
        if request.method() == http::Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return super::reply(cors_preflight(cors, &origin));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(cors) = &routed.route().cors {
                cors_allow(cors, &origin, response.headers_mut());
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        extensions::filters::http::cors::v3::CorsPolicy,
        r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
    };
    use tower::ServiceExt;

    use super::*;
    use crate::{
        config::route::CORS_FILTER,
        http::test_support::{Recorder, per_filter, request, route_to, routed},
    };

    /// A request from `origin` on a route whose policy allows
    /// `https://shop.example`.
    fn from(origin: &str, preflight: bool) -> Request {
        let mut route = route_to("c", |_| {});
        let policy = CorsPolicy {
            allow_origin_string_match: vec![StringMatcher {
                match_pattern: Some(MatchPattern::Exact("https://shop.example".into())),
                ..Default::default()
            }],
            allow_methods: "GET,POST".into(),
            ..Default::default()
        };
        per_filter(&mut route, CORS_FILTER, policy);
        let mut request = routed(request("http://shop/cart"), route);
        let headers = request.headers_mut();
        headers.insert(header::ORIGIN, origin.parse().unwrap());
        if preflight {
            *request.method_mut() = http::Method::OPTIONS;
            request.headers_mut().insert(
                header::ACCESS_CONTROL_REQUEST_METHOD,
                "POST".parse().unwrap(),
            );
        }
        request
    }

    #[tokio::test]
    async fn a_preflight_is_answered_by_the_routes_policy_without_the_app() {
        let app = Recorder::default();
        let cors = layer(true).layer(app.answering("app"));
        let response = cors
            .oneshot(from("https://shop.example", true))
            .await
            .unwrap();
        assert_eq!(
            response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        assert_eq!(
            response.headers()[header::ACCESS_CONTROL_ALLOW_METHODS],
            "GET,POST"
        );
        assert_eq!(app.count(), 0);
    }

    #[tokio::test]
    async fn responses_are_marked_for_allowed_origins_only() {
        let app = Recorder::default();
        let cors = layer(true).layer(app.answering("app"));
        let allowed = cors
            .clone()
            .oneshot(from("https://shop.example", false))
            .await
            .unwrap();
        assert_eq!(
            allowed.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        let other = cors
            .oneshot(from("https://evil.example", false))
            .await
            .unwrap();
        assert!(
            !other
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        assert_eq!(app.count(), 2);
    }

    #[tokio::test]
    async fn without_the_filter_a_preflight_goes_to_the_app() {
        let app = Recorder::default();
        let off = layer(false).layer(app.answering("app"));
        let response = off
            .oneshot(from("https://shop.example", true))
            .await
            .unwrap();
        assert!(
            !response
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        assert_eq!(app.count(), 1);
    }
}
