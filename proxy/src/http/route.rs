//! The route stage: finds the request's route in the route configuration
//! its chain names, looked up per request so that a route change applies
//! to open connections, and passes it down as [`Routed`]. With no route,
//! it answers 404 itself. The route's response header operations apply to
//! whatever comes back. A plaintext request to a virtual host that
//! requires TLS (a Gateway server's `httpsRedirect`) is redirected to
//! HTTPS.

use std::sync::Arc;

use http::StatusCode;
use tokio::sync::watch;
use tower::{Layer, Service};

use super::{Request, Stage, filters::apply_response_ops};
use crate::config::{
    Snapshot,
    listener::Routes,
    route::{Forward, RequestParts, Route, RouteIndex, RouteTable},
};

/// The route a request took, with its table kept alive while the request
/// runs.
#[derive(Debug, Clone)]
pub struct Routed {
    table: Arc<RouteTable>,
    index: RouteIndex,
}

impl Routed {
    pub fn route(&self) -> &Route {
        self.table.at(self.index)
    }

    /// The route's forwarding, when it forwards.
    pub fn forward(&self) -> Option<&Forward> {
        match &self.route().action {
            crate::config::route::Action::Forward(f) => Some(f),
            _ => None,
        }
    }
}

#[cfg(test)]
impl Routed {
    /// The route `request` takes in `table`.
    pub(crate) fn of(table: Arc<RouteTable>, request: &Request) -> Option<Self> {
        let index = table.find(&RequestParts::of(request))?;
        Some(Self { table, index })
    }
}

/// Where routes come from.
struct Source {
    config: watch::Receiver<Arc<Snapshot>>,
    routes: Routes,
    /// Whether the connection is TLS.
    tls: bool,
}

#[derive(Clone)]
pub struct RouteStage<S> {
    source: Arc<Source>,
    inner: S,
}

/// Routes by `routes`, for a connection over TLS or not (`tls`).
pub fn layer<S>(
    config: watch::Receiver<Arc<Snapshot>>,
    routes: Routes,
    tls: bool,
) -> impl Layer<S, Service = RouteStage<S>> + Clone {
    let source = Arc::new(Source {
        config,
        routes,
        tls,
    });
    tower::layer::layer_fn(move |inner| RouteStage {
        source: source.clone(),
        inner,
    })
}

impl<S: Stage<std::convert::Infallible>> RouteStage<S> {
    fn table(&self) -> Option<Arc<RouteTable>> {
        match &self.source.routes {
            Routes::Rds(name) => self.source.config.borrow().routes.get(name).cloned(),
            Routes::Inline(table) => Some(table.clone()),
        }
    }
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for RouteStage<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, mut request: Request) -> Self::Future {
        let Some(table) = self.table() else {
            return super::answer(StatusCode::NOT_FOUND, "no route configuration");
        };
        let parts = RequestParts::of(&request);
        if !self.source.tls && table.requires_tls(&parts) {
            let mut redirect = super::local_reply(StatusCode::MOVED_PERMANENTLY, "redirected");
            let location = format!("https://{}{}", parts.authority, parts.path);
            if let Ok(location) = http::HeaderValue::from_str(&location) {
                redirect
                    .headers_mut()
                    .insert(http::header::LOCATION, location);
            }
            return super::reply(redirect);
        }
        let Some(index) = table.find(&parts) else {
            let why = format!("no route for {}{}", parts.authority, parts.path);
            return super::answer(StatusCode::NOT_FOUND, &why);
        };
        let routed = Routed { table, index };
        request.extensions_mut().insert(routed.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            apply_response_ops(&routed.route().headers, response.headers_mut());
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::{
        core::v3::{HeaderValue, HeaderValueOption},
        route::v3 as xds,
    };
    use tower::ServiceExt;

    use super::*;
    use crate::http::test_support::{Recorder, request, route_to, table, text};

    fn config(name: &str, routes: Vec<xds::Route>) -> Snapshot {
        Snapshot {
            routes: [(name.to_string(), table(routes))].into(),
            ..Default::default()
        }
    }

    fn named(name: &str, header: &str) -> xds::Route {
        let mut route = route_to("c", |_| {});
        route.name = name.into();
        route.response_headers_to_add = vec![HeaderValueOption {
            header: Some(HeaderValue {
                key: "x-route".into(),
                value: header.into(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        route
    }

    #[tokio::test]
    async fn a_request_takes_the_route_its_table_has_at_that_moment() {
        let (tx, rx) = watch::channel(Arc::new(config("80", vec![named("first", "1")])));
        let app = Recorder::default();
        let stage = layer(rx, Routes::Rds("80".into()), false).layer(app.answering("ok"));
        let routed_to = |app: &Recorder| {
            let parts = app.last();
            parts
                .extensions
                .get::<Routed>()
                .unwrap()
                .route()
                .name
                .clone()
        };

        let response = stage.clone().oneshot(request("http://x/")).await.unwrap();
        assert_eq!(response.headers()["x-route"], "1");
        assert_eq!(routed_to(&app), "first");

        // The same connection's stage, after a route change.
        tx.send(Arc::new(config("80", vec![named("second", "2")])))
            .unwrap();
        let response = stage.oneshot(request("http://x/")).await.unwrap();
        assert_eq!(response.headers()["x-route"], "2");
        assert_eq!(routed_to(&app), "second");
    }

    #[tokio::test]
    async fn a_plaintext_request_to_a_host_that_requires_tls_is_sent_to_https() {
        let secure = RouteTable::compile(&xds::RouteConfiguration {
            name: "http.80".into(),
            virtual_hosts: vec![xds::VirtualHost {
                name: "bookinfo".into(),
                domains: vec!["bookinfo.example".into()],
                routes: vec![route_to("c", |_| {})],
                require_tls: xds::virtual_host::TlsRequirementType::All as i32,
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let app = Recorder::default();
        let routes = Routes::Inline(Arc::new(secure));
        let plaintext = layer(rx.clone(), routes.clone(), false).layer(app.answering("ok"));
        let response = plaintext
            .oneshot(request("http://bookinfo.example/productpage?u=1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            response.headers()[http::header::LOCATION],
            "https://bookinfo.example/productpage?u=1"
        );
        assert_eq!(app.count(), 0);

        let over_tls = layer(rx, routes, true).layer(app.answering("ok"));
        let response = over_tls
            .oneshot(request("http://bookinfo.example/productpage"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn without_a_table_or_a_matching_route_the_answer_is_404_saying_why() {
        let (_tx, rx) = watch::channel(Arc::new(config("80", vec![])));
        let app = Recorder::default();
        let missing = layer(rx.clone(), Routes::Rds("81".into()), false).layer(app.answering("ok"));
        let response = missing.oneshot(request("http://x/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(text(response).await, "no route configuration\n");

        let mut api = route_to("c", |_| {});
        api.r#match = Some(xds::RouteMatch {
            path_specifier: Some(xds::route_match::PathSpecifier::Prefix("/api".into())),
            ..Default::default()
        });
        let inline = layer(rx, Routes::Inline(table(vec![api])), false).layer(app.answering("ok"));
        let response = inline.oneshot(request("http://x/home")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(text(response).await, "no route for x/home\n");
        assert_eq!(app.count(), 0);
    }
}
