//! The inbound stack: requests arriving for this workload's service (over
//! mutual TLS from other proxies, or plaintext where the chain allows it),
//! on their way to the app.
//!
//! access log → JWT → RBAC → Mixer check and report → route → CORS → fault →
//! forward → mirror → retry → timeout → balance → connect

use std::{convert::Infallible, sync::Arc};

use tower::ServiceBuilder;

use crate::{
    config::listener::{HttpApp, InboundService},
    http::{self, Connection, Stage, access_log, jwt, mixer, rbac},
    listeners::Shared,
};

pub fn stack(
    app: &Arc<HttpApp>,
    service: &InboundService,
    shared: &Shared,
    connection: Arc<Connection>,
) -> impl Stage<Infallible> {
    ServiceBuilder::new()
        .layer(access_log::layer(access_log::Observing::of(
            app,
            shared,
            &connection,
        )))
        .layer(jwt::layer(app.jwt.clone()))
        .layer(rbac::layer(app.clone(), connection.clone()))
        .layer(mixer::layer(
            shared.mixer.clone(),
            connection.clone(),
            service.clone(),
        ))
        // A caller's attributes are the server proxy's alone.
        .service(http::routing(app, shared, connection, None))
}
