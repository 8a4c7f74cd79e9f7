//! The HTTP path: a connection served by hyper (HTTP/1.1 or HTTP/2, told
//! apart by hyper from the connection's first bytes; gRPC rides HTTP/2),
//! each request through a stack of `tower` layers. The stack is
//! [`inbound`](crate::inbound)'s or [`outbound`](crate::outbound)'s, by
//! the app's direction, and both end in the same [`routing`] tail:
//!
//! route → CORS → fault → forward → mirror → retry → timeout → balance → connect
//!
//! Above `forward`, a stage answers every request (its own replies
//! included: no route, no cluster, faults). From `forward` down, a stage
//! may fail with a [`Failure`], which `retry` may try again and `forward`
//! turns into the local reply that says why, as Envoy's do.
//!
//! Every stage is always ready: the proxy's back-pressure is the circuit
//! breaker's, taken per attempt in `balance`, so `poll_ready` is not
//! driven. Stages pass what they decided to those below as request
//! extensions ([`route::Routed`], [`forward::Target`], ...).

use std::{convert::Infallible, net::SocketAddr, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::{Service, ServiceBuilder};

pub mod access_log;
pub mod balance;
pub mod body;
pub mod connect;
pub mod cors;
pub mod fault;
mod filters;
pub mod forward;
pub mod jwt;
pub mod mirror;
pub mod mixer;
pub mod rbac;
pub mod retry;
pub mod route;
pub mod timeout;

use crate::{
    config::listener::HttpApp,
    listeners::Shared,
    stats::Stats,
    upstream::{Body, BoxError},
};

pub type Request = http::Request<Body>;
pub type Response = http::Response<Body>;
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response, E>> + Send + 'static>>;

/// A stage of the stack, failing with `E`: `Infallible` for those that
/// answer every request, [`Failure`] for those below `forward`. Every
/// stage's future is boxed once, by the stage that makes it, so that one
/// passing a request on returns its inner stage's future as it is.
pub trait Stage<E>:
    Service<Request, Response = Response, Error = E, Future = ResponseFuture<E>>
    + Clone
    + Send
    + 'static
{
}

impl<S, E> Stage<E> for S where
    S: Service<Request, Response = Response, Error = E, Future = ResponseFuture<E>>
        + Clone
        + Send
        + 'static
{
}

/// The `Service` items every stage writes alike: its types, and
/// readiness (always; see the module's doc).
macro_rules! stage_service {
    ($error:ty) => {
        type Response = $crate::http::Response;
        type Error = $error;
        type Future = $crate::http::ResponseFuture<$error>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), $error>> {
            std::task::Poll::Ready(Ok(()))
        }
    };
}
use stage_service;

/// What the proxy knows of a connection, for each of its requests.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The SPIFFE identity the client proved over mesh TLS.
    pub peer_identity: Option<String>,
    /// Where the connection was going (for original-destination clusters).
    pub destination: Option<SocketAddr>,
    /// Whether the proxy terminated TLS on it.
    pub tls: bool,
}

/// Why a request could not be sent upstream, or got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The route names a cluster the proxy does not have.
    NoCluster(String),
    /// The circuit breaker's queue is full.
    Overflow,
    NoHealthyUpstream,
    /// No connection could be made.
    ConnectFailed(String),
    /// The connection broke before a response.
    Reset(String),
    TimedOut,
    /// The request cannot be sent as it is.
    BadRequest(String),
}

impl Failure {
    /// The local reply that tells the caller.
    pub fn reply(&self) -> Response {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        match self {
            Self::NoCluster(name) => local_reply(unavailable, &format!("cluster {name} not found")),
            Self::Overflow => {
                let mut overflow = local_reply(unavailable, "upstream overflow");
                overflow
                    .headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
                overflow
            }
            Self::NoHealthyUpstream => local_reply(unavailable, "no healthy upstream"),
            Self::ConnectFailed(why) => {
                local_reply(unavailable, &format!("upstream connect error: {why}"))
            }
            Self::Reset(why) => local_reply(unavailable, &format!("upstream reset: {why}")),
            Self::TimedOut => local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            Self::BadRequest(why) => local_reply(StatusCode::BAD_REQUEST, why),
        }
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A reply of the proxy's own.
pub fn local_reply(status: StatusCode, why: &str) -> Response {
    let mut response = http::Response::new(full(format!("{why}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Bounds on what one downstream HTTP connection may send.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct HttpLimits {
    /// Largest request header block, in KiB (Envoy's
    /// `max_request_headers_kb`, and its default). An HTTP/1 request over
    /// it is answered 431 and counted
    /// (`proxy_limit_reached_total{limit="request_headers"}`); an HTTP/2
    /// one has its stream reset.
    #[arg(long, default_value_t = 60)]
    pub max_request_headers_kb: u32,
    /// Most concurrent HTTP/2 streams on one downstream connection,
    /// advertised to the client (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = 1024)]
    pub max_concurrent_streams: u32,
}

/// hyper reads HTTP/1 heads into a buffer no smaller than this.
const MIN_HTTP1_BUFFER: usize = 8 << 10;

/// Serves one connection with `stack` until it closes.
pub async fn serve<IO, S>(io: IO, stack: S, limits: HttpLimits, stats: &Stats)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Stage<Infallible>,
{
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let request = request.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed());
        stack.clone().call(request)
    });
    let header_bytes = limits.max_request_headers_kb.saturating_mul(1024);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size((header_bytes as usize).max(MIN_HTTP1_BUFFER));
    builder
        .http2()
        .max_header_list_size(header_bytes)
        .max_concurrent_streams(limits.max_concurrent_streams);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
        {
            stats.limit_reached("request_headers");
        }
        tracing::debug!("connection ended: {e}");
    }
}

/// The tail both stacks share: the route, its filters, then forwarding
/// to an endpoint of the chosen cluster. `attributes` are Mixer's
/// attributes of this workload, sent with outbound requests.
pub fn routing(
    app: &HttpApp,
    shared: &Shared,
    connection: Arc<Connection>,
    attributes: Option<HeaderValue>,
) -> impl Stage<Infallible> {
    let upstreams = &shared.upstreams;
    ServiceBuilder::new()
        .layer(route::layer(
            shared.config.clone(),
            app.routes.clone(),
            connection.tls,
        ))
        .layer(cors::layer(app.cors))
        .layer(fault::layer(app.fault))
        .layer(forward::layer(forward::Forwarding {
            upstreams: upstreams.clone(),
            connection: connection.clone(),
            direction: app.direction.label(),
            attributes,
        }))
        .layer(mirror::layer(upstreams.clone()))
        .layer(retry::layer(upstreams.stats.clone()))
        .layer(timeout::layer())
        .layer(balance::layer(connection.destination))
        .service(connect::Connect)
}

/// A local reply, as a stage's future.
fn answer<E: Send + 'static>(status: StatusCode, why: &str) -> ResponseFuture<E> {
    reply(local_reply(status, why))
}

/// `response` at once, as a stage's future.
fn reply<E: Send + 'static>(response: Response) -> ResponseFuture<E> {
    Box::pin(std::future::ready(Ok(response)))
}

/// `failure` at once, as a stage's future.
fn fail(failure: Failure) -> ResponseFuture<Failure> {
    Box::pin(std::future::ready(Err(failure)))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Requests, mock services and response reading for the layers' tests.

    use std::sync::Mutex;

    use envoy_types::pb::envoy::config::route::v3 as xds;
    use tower::util::BoxCloneService;

    use super::*;
    use crate::config::RouteTable;

    pub fn request(uri: &str) -> Request {
        http::Request::builder()
            .uri(uri)
            .body(full(Bytes::new()))
            .unwrap()
    }

    /// A route on `/` to `cluster`, its action changed by `action`.
    pub fn route_to(cluster: &str, action: impl FnOnce(&mut xds::RouteAction)) -> xds::Route {
        let mut forward = xds::RouteAction {
            cluster_specifier: Some(xds::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        };
        action(&mut forward);
        xds::Route {
            name: "r".into(),
            r#match: Some(xds::RouteMatch {
                path_specifier: Some(xds::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(xds::route::Action::Route(forward)),
            ..Default::default()
        }
    }

    /// `route` with `settings` for the HTTP filter `filter`.
    pub fn per_filter(route: &mut xds::Route, filter: &str, settings: impl prost::Message) {
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: String::new(),
            value: settings.encode_to_vec(),
        };
        route.typed_per_filter_config.insert(filter.into(), any);
    }

    /// A route table of `routes` for any domain.
    pub fn table(routes: Vec<xds::Route>) -> Arc<RouteTable> {
        let table = RouteTable::compile(&xds::RouteConfiguration {
            name: "test".into(),
            virtual_hosts: vec![xds::VirtualHost {
                name: "any".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        });
        Arc::new(table.unwrap())
    }

    /// `request`, routed by `route` as the route stage would.
    pub fn routed(mut request: Request, route: xds::Route) -> Request {
        let routed = route::Routed::of(table(vec![route]), &request).expect("the route matches");
        request.extensions_mut().insert(routed);
        request
    }

    pub async fn text(response: Response) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A service that records each request's parts and answers `status`.
    #[derive(Clone, Default)]
    pub struct Recorder {
        pub seen: Arc<Mutex<Vec<http::request::Parts>>>,
    }

    impl Recorder {
        pub fn count(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        pub fn last(&self) -> http::request::Parts {
            self.seen
                .lock()
                .unwrap()
                .last()
                .cloned()
                .expect("a request")
        }

        /// Answers 200 with `body`, after recording the request.
        pub fn answering<E: Send + 'static>(
            &self,
            body: &'static str,
        ) -> BoxCloneService<Request, Response, E> {
            let seen = self.seen.clone();
            BoxCloneService::new(tower::service_fn(move |request: Request| {
                let (parts, _) = request.into_parts();
                seen.lock().unwrap().push(parts);
                std::future::ready(Ok(http::Response::new(full(body))))
            }))
        }
    }
}
