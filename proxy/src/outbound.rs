//! The outbound stack: requests from this workload (or, on a gateway,
//! from outside) to the services it calls, carrying this workload's Mixer
//! attributes for the server's proxy.
//!
//! access log → JWT → RBAC → route → CORS → fault → forward → mirror → retry →
//! timeout → balance → connect

use std::{convert::Infallible, sync::Arc};

use tower::ServiceBuilder;

use crate::{
    config::listener::HttpApp,
    http::{self, Connection, Stage, access_log, jwt, rbac},
    listeners::Shared,
};

pub fn stack(
    app: &Arc<HttpApp>,
    shared: &Shared,
    connection: Arc<Connection>,
) -> impl Stage<Infallible> {
    let attributes = shared.mixer.forwarded_attributes().cloned();
    ServiceBuilder::new()
        .layer(access_log::layer(access_log::Observing::of(
            app,
            shared,
            &connection,
        )))
        .layer(jwt::layer(app.jwt.clone()))
        .layer(rbac::layer(app.clone(), connection.clone()))
        .service(http::routing(app, shared, connection, attributes))
}
