//! The RBAC stage (when the chain has Envoy's HTTP RBAC filter): a request
//! its policies do not allow is answered 403 and goes no further.

use std::sync::Arc;

use http::StatusCode;
use tower::{Layer, Service};

use super::{Connection, Request, Stage};
use crate::config::{listener::HttpApp, rbac::Subject, route::RequestParts};

#[derive(Clone)]
pub struct Rbac<S> {
    /// Holds the filter (the app's, when it has one).
    app: Arc<HttpApp>,
    connection: Arc<Connection>,
    inner: S,
}

pub fn layer<S>(
    app: Arc<HttpApp>,
    connection: Arc<Connection>,
) -> impl Layer<S, Service = Rbac<S>> + Clone {
    tower::layer::layer_fn(move |inner| Rbac {
        app: app.clone(),
        connection: connection.clone(),
        inner,
    })
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for Rbac<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(rbac) = &self.app.rbac {
            let subject = Subject {
                request: Some(&RequestParts::of(&request)),
                end_user: request.extensions().get(),
                peer_identity: self.connection.peer_identity.as_deref(),
                peer: self.connection.peer,
                destination: self.connection.destination,
            };
            if !rbac.allows(&subject) {
                return super::answer(StatusCode::FORBIDDEN, "RBAC: access denied");
            }
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::{
        config::rbac::v3::{
            self as xds, Permission, Policy, Principal,
            permission::Rule,
            principal::{Authenticated, Identifier},
            rbac::Action,
        },
        r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern},
    };
    use tower::ServiceExt;

    use super::*;
    use crate::{
        config::{
            listener::{Direction, Routes},
            rbac::RbacFilter,
        },
        http::test_support::{Recorder, request, table, text},
    };

    const PRODUCTPAGE: &str = "spiffe://cluster.local/ns/shop/sa/productpage";

    /// An app whose RBAC allows productpage alone.
    fn productpage_only() -> Arc<HttpApp> {
        let rules = xds::Rbac {
            action: Action::Allow as i32,
            policies: [(
                "productpage".to_string(),
                Policy {
                    permissions: vec![Permission {
                        rule: Some(Rule::Any(true)),
                    }],
                    principals: vec![Principal {
                        identifier: Some(Identifier::Authenticated(Authenticated {
                            principal_name: Some(StringMatcher {
                                match_pattern: Some(MatchPattern::Exact(PRODUCTPAGE.into())),
                                ..Default::default()
                            }),
                        })),
                    }],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        Arc::new(HttpApp {
            stat_prefix: "inbound|9080||ratings".into(),
            direction: Direction::Outbound,
            routes: Routes::Inline(table(vec![])),
            rbac: Some(RbacFilter::compile(Some(&rules), None).unwrap()),
            jwt: None,
            fault: false,
            cors: false,
        })
    }

    fn from(identity: Option<&str>) -> Arc<Connection> {
        Arc::new(Connection {
            peer: "10.0.0.9:40000".parse().unwrap(),
            peer_identity: identity.map(str::to_string),
            destination: None,
            tls: false,
        })
    }

    #[tokio::test]
    async fn only_what_the_policies_allow_reaches_the_app() {
        let app = Recorder::default();
        let allowed =
            layer(productpage_only(), from(Some(PRODUCTPAGE))).layer(app.answering("app"));
        let response = allowed.oneshot(request("/ratings")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(app.count(), 1);

        let other = from(Some("spiffe://cluster.local/ns/shop/sa/reviews"));
        for connection in [other, from(None)] {
            let denied = layer(productpage_only(), connection).layer(app.answering("app"));
            let response = denied.oneshot(request("/ratings")).await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(text(response).await, "RBAC: access denied\n");
        }
        assert_eq!(app.count(), 1);
    }
}
