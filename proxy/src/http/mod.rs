//! The HTTP path: a connection served by hyper (HTTP/1.1 or HTTP/2, which
//! also carries gRPC), each request routed by the route configuration the
//! connection's chain names (looked up per request, so a route change
//! applies to open connections), through the fault and CORS filters, then
//! forwarded with the route's timeout and retries to an endpoint of the
//! chosen cluster. What the proxy answers itself (no route, no endpoint,
//! timeouts, faults) says why in the body, as Envoy's local replies do.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::watch,
};

pub mod body;
mod filters;

use self::filters::{
    aborted, apply_request_ops, apply_response_ops, cors_allow, cors_preflight, forwarded_headers,
    redirect, shadow, upstream_request,
};
use crate::{
    config::{
        Snapshot,
        listener::{Direction, HttpApp, InboundService, Routes},
        rbac::{RbacFilter, Subject},
        route::{Action, Forward, RequestParts, RetryPolicy, Route},
    },
    mixer::MixerFilter,
    stats::{RequestLabels, Stats},
    trace::Tracing,
    upstream::{Body, BoxError, UpstreamCluster, Upstreams},
};

/// Request bodies up to this size are kept for retries and mirrors;
/// larger ones stream through once.
const RETRY_BUFFER: u64 = 64 * 1024;

/// What serving one connection needs.
pub struct HttpContext {
    pub app: Arc<HttpApp>,
    pub config: watch::Receiver<Arc<Snapshot>>,
    pub upstreams: Arc<Upstreams>,
    pub peer: SocketAddr,
    /// The SPIFFE identity the client proved over mesh TLS.
    pub peer_identity: Option<String>,
    /// Where the connection was going (for original-destination clusters).
    pub destination: Option<SocketAddr>,
    pub mixer: Arc<MixerFilter>,
    /// Log each request (target `access`).
    pub access_log: bool,
    pub tracing: Arc<Tracing>,
}

/// Serves one connection until it closes.
pub async fn serve<IO>(io: IO, context: Arc<HttpContext>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let context = context.clone();
        async move { Ok::<_, Infallible>(handle(request, &context).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!("connection ended: {e}");
    }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A reply of the proxy's own.
pub fn local_reply(status: StatusCode, why: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{why}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

async fn handle(mut request: Request<Incoming>, context: &HttpContext) -> Response<Body> {
    let traced = context.tracing.is_on();
    if !context.access_log && !traced {
        return checked(request, context).await;
    }
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let authority = RequestParts::of(&request).authority.to_string();
    let inbound = matches!(context.app.direction, Direction::Inbound(_));
    let span = context.tracing.start(
        request.headers_mut(),
        format!("{authority}{}", uri.path()),
        inbound,
    );
    let response = checked(request, context).await;
    let status = response.status().as_u16();
    if let Some(span) = span {
        span.finish(method.as_str(), &authority, uri.path(), status);
    }
    if !context.access_log {
        return response;
    }
    // Logged when the body ends: its size, and the time to its last byte.
    let (app, peer, identity) = (
        context.app.clone(),
        context.peer,
        context.peer_identity.clone(),
    );
    body::on_end(response, move |bytes| {
        tracing::info!(
            target: "access",
            %method,
            %uri,
            %authority,
            status,
            bytes,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            %peer,
            peer_identity = identity.as_deref().unwrap_or_default(),
            listener = %app.stat_prefix,
        );
    })
}

/// RBAC, then (inbound) Mixer, then routing.
async fn checked(request: Request<Incoming>, context: &HttpContext) -> Response<Body> {
    if let Some(rbac) = &context.app.rbac
        && !rbac_allows(rbac, &request, context)
    {
        return local_reply(StatusCode::FORBIDDEN, "RBAC: access denied");
    }
    // Inbound requests are checked with Mixer first, and reported after.
    let Some(InboundService {
        host: service,
        port,
    }) = context
        .app
        .direction
        .inbound()
        .filter(|_| context.mixer.is_on())
    else {
        return route(request, context).await;
    };
    let inbound = context.mixer.inbound(
        &request,
        context.peer,
        context.peer_identity.as_deref(),
        service,
        *port,
    );
    let request_size = content_length(request.headers());
    let response = match context.mixer.check(&inbound).await {
        Some((status, why)) => local_reply(status, &why),
        None => route(request, context).await,
    };
    context.mixer.report_at_end(inbound, request_size, response)
}

fn rbac_allows(rbac: &RbacFilter, request: &Request<Incoming>, context: &HttpContext) -> bool {
    rbac.allows(&Subject {
        request: Some(&RequestParts::of(request)),
        peer_identity: context.peer_identity.as_deref(),
        peer: context.peer,
        destination: context.destination,
    })
}

fn content_length(headers: &http::HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn route(request: Request<Incoming>, context: &HttpContext) -> Response<Body> {
    let snapshot = context.config.borrow().clone();
    let table = match &context.app.routes {
        Routes::Rds(name) => snapshot.routes.get(name).cloned(),
        Routes::Inline(table) => Some(table.clone()),
    };
    let Some(table) = table else {
        return local_reply(StatusCode::NOT_FOUND, "no route configuration");
    };
    let parts = RequestParts::of(&request);
    // Kept for redirects, after the request is gone.
    let (authority, path) = (parts.authority.to_string(), parts.path.to_string());
    let Some(route) = table
        .virtual_host(parts.authority)
        .and_then(|vh| vh.route(&parts))
    else {
        return local_reply(
            StatusCode::NOT_FOUND,
            &format!("no route for {authority}{path}"),
        );
    };
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    if context.app.cors
        && let (Some(cors), Some(origin)) = (&route.cors, &origin)
        && request.method() == http::Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return cors_preflight(cors, origin);
    }
    if context.app.fault
        && let Some(fault) = &route.fault
    {
        if let Some((delay, share)) = fault.delay
            && share.roll()
        {
            tokio::time::sleep(delay).await;
        }
        if let Some((abort, share)) = fault.abort
            && share.roll()
        {
            return aborted(abort);
        }
    }
    let mut response = match &route.action {
        Action::Redirect {
            host,
            path: to,
            code,
        } => redirect(host, to, *code, &authority, &path),
        Action::Direct { status, body } => {
            let mut r = Response::new(full(body.clone()));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            r
        }
        Action::Forward(forward) => self::forward(request, route, forward, context).await,
    };
    apply_response_ops(&route.headers, response.headers_mut());
    if context.app.cors
        && let (Some(cors), Some(origin)) = (&route.cors, &origin)
    {
        cors_allow(cors, origin, response.headers_mut());
    }
    response
}

/// A request body, kept whole when small enough to send again.
enum Outgoing {
    Buffered(Bytes),
    Streaming(Incoming),
}

async fn forward(
    request: Request<Incoming>,
    route: &Route,
    forward: &Forward,
    context: &HttpContext,
) -> Response<Body> {
    let weighted = forward.pick();
    let Some(cluster) = context.upstreams.get(&weighted.name) else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {} not found", weighted.name),
        );
    };
    let (mut parts, body) = request.into_parts();
    apply_request_ops(&route.headers, &mut parts.headers);
    apply_request_ops(&weighted.headers, &mut parts.headers);
    let original_path = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let path = route.rewrite(&original_path, forward.prefix_rewrite.as_deref());
    let attributes = match context.app.direction {
        Direction::Outbound => context.mixer.forwarded_attributes(),
        Direction::Inbound(_) => None,
    };
    forwarded_headers(
        &mut parts,
        forward.host_rewrite.as_deref(),
        attributes,
        context.peer_identity.as_deref(),
    );
    let retry = forward.retry.as_ref().filter(|r| r.attempts > 0);
    let small = http_body::Body::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= RETRY_BUFFER);
    let outgoing = if (retry.is_some() || !forward.mirrors.is_empty()) && small {
        match body.collect().await {
            Ok(collected) => Outgoing::Buffered(collected.to_bytes()),
            Err(e) => return local_reply(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
        }
    } else {
        Outgoing::Streaming(body)
    };
    if let Outgoing::Buffered(bytes) = &outgoing {
        for mirror in &forward.mirrors {
            mirror_to(context, mirror, &parts, &path, bytes.clone());
        }
    }
    let hashed = forward.hash.hash(&parts.headers, context.peer.ip());
    let Some(_admitted) = cluster.admit().await else {
        let mut overflow = local_reply(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow");
        overflow
            .headers_mut()
            .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        return overflow;
    };
    let started = std::time::Instant::now();
    let retried = AtomicU64::new(0);
    let target = Target {
        cluster: &cluster,
        retry,
        hash: hashed.as_ref().map(|h| h.key),
        destination: context.destination,
        deadline: forward.timeout.map(|t| tokio::time::Instant::now() + t),
        retried: &retried,
    };
    let mut response = send_with_retries(&target, parts, &path, outgoing).await;
    if let Some(cookie) = hashed.and_then(|h| h.set_cookie) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    apply_response_ops(&weighted.headers, response.headers_mut());
    let stats = &context.upstreams.stats;
    let labels = Stats::cluster(&weighted.name);
    let direction = context.app.direction.label();
    stats
        .requests
        .get_or_create(&RequestLabels {
            direction,
            cluster: weighted.name.clone(),
            response_code: response.status().as_u16(),
        })
        .inc();
    stats
        .request_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    let retried = retried.load(Ordering::Relaxed);
    if retried > 0 {
        stats.retries.get_or_create(&labels).inc_by(retried);
    }
    response
}

/// Sends a copy to `cluster` and forgets it: a mirror's answer is not the
/// caller's.
fn mirror_to(
    context: &HttpContext,
    cluster: &str,
    parts: &http::request::Parts,
    path: &str,
    body: Bytes,
) {
    let Some(cluster) = context.upstreams.get(cluster) else {
        return;
    };
    let mut headers = parts.headers.clone();
    shadow(&mut headers);
    let method = parts.method.clone();
    let path = path.to_string();
    tokio::spawn(async move {
        let Some(endpoint) = cluster.pick(&[], None, None) else {
            return;
        };
        let Ok(request) = upstream_request(&method, &headers, endpoint.addr, &path, full(body))
        else {
            return;
        };
        let _ = cluster.client().request(request).await;
    });
}

/// What one attempt came to.
enum Attempt {
    Answered(Response<Incoming>),
    /// No connection could be made.
    ConnectFailed(String),
    /// The connection broke before a response.
    Reset(String),
    TimedOut,
}

/// Where and how a request is forwarded.
struct Target<'a> {
    cluster: &'a UpstreamCluster,
    retry: Option<&'a RetryPolicy>,
    /// The ring-hash key.
    hash: Option<u64>,
    /// The connection's original destination.
    destination: Option<SocketAddr>,
    /// When the route's timeout ends every attempt.
    deadline: Option<tokio::time::Instant>,
    /// Attempts after the first, counted for stats.
    retried: &'a AtomicU64,
}

async fn send_with_retries(
    target: &Target<'_>,
    parts: http::request::Parts,
    path: &str,
    outgoing: Outgoing,
) -> Response<Body> {
    let Target {
        cluster,
        retry,
        hash,
        destination,
        deadline,
        retried,
    } = *target;
    let (mut streaming, buffered) = match outgoing {
        Outgoing::Buffered(b) => (None, Some(b)),
        Outgoing::Streaming(body) => (Some(body), None),
    };
    // A streamed body can be sent once only.
    let retries = match (&buffered, retry) {
        (Some(_), Some(r)) => r.attempts,
        _ => 0,
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt_no = 0;
    let mut retry_place = None;
    loop {
        let avoid = if retry.is_some_and(|r| r.other_hosts) {
            &tried[..]
        } else {
            &[]
        };
        let Some(endpoint) = cluster.pick(avoid, hash, destination) else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        tried.push(endpoint.addr);
        let body = match (&buffered, streaming.take()) {
            (Some(bytes), _) => full(bytes.clone()),
            (None, Some(body)) => body.map_err(|e| Box::new(e) as BoxError).boxed(),
            (None, None) => full(Bytes::new()),
        };
        let request =
            match upstream_request(&parts.method, &parts.headers, endpoint.addr, path, body) {
                Ok(r) => r,
                Err(e) => return local_reply(StatusCode::BAD_REQUEST, &format!("request: {e}")),
            };
        let in_flight = endpoint.in_flight();
        let sent = cluster.client().request(request);
        // An attempt ends at its per-try timeout or the route's deadline,
        // whichever is first; either way it counts against the endpoint.
        let per_try = retry
            .and_then(|r| r.per_try_timeout)
            .map(|t| tokio::time::Instant::now() + t);
        let outcome = match per_try.into_iter().chain(deadline).min() {
            Some(until) => tokio::time::timeout_at(until, sent).await.ok(),
            None => Some(sent.await),
        };
        drop(in_flight);
        let attempt = match outcome {
            None => Attempt::TimedOut,
            Some(Ok(response)) => Attempt::Answered(response),
            Some(Err(e)) if e.is_connect() => Attempt::ConnectFailed(error_chain(&e)),
            Some(Err(e)) => Attempt::Reset(error_chain(&e)),
        };
        let failed = match &attempt {
            Attempt::Answered(r) => r.status().is_server_error(),
            _ => true,
        };
        cluster.record(&endpoint, failed);
        attempt_no += 1;
        // The retry just made, if it was one, is over.
        drop(retry_place.take());
        retry_place = if attempt_no <= retries && retry.is_some_and(|r| retriable(r, &attempt)) {
            cluster.start_retry()
        } else {
            None
        };
        let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
        let again = retry_place.is_some() && !expired;
        if !again {
            return match attempt {
                Attempt::Answered(r) => r.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()),
                Attempt::ConnectFailed(why) => local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream connect error: {why}"),
                ),
                Attempt::Reset(why) => local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("upstream reset: {why}"),
                ),
                Attempt::TimedOut => {
                    local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                }
            };
        }
        retried.fetch_add(1, Ordering::Relaxed);
        // Envoy's retry back-off: 25 ms base, jittered; never past the
        // route's deadline.
        let back_off = tokio::time::Instant::now()
            + Duration::from_millis(fastrand::u64(0..25 * attempt_no as u64));
        let until = deadline.map_or(back_off, |d| d.min(back_off));
        tokio::time::sleep_until(until).await;
        if deadline.is_some_and(|d| until >= d) {
            return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn retriable(policy: &RetryPolicy, attempt: &Attempt) -> bool {
    match attempt {
        Attempt::ConnectFailed(_) => {
            policy.on_connect_failure || policy.on_5xx || policy.on_gateway_error
        }
        Attempt::Reset(_) => policy.on_reset || policy.on_5xx || policy.on_refused_stream,
        Attempt::TimedOut => policy.on_5xx || policy.on_gateway_error,
        Attempt::Answered(r) => {
            let code = r.status().as_u16();
            let grpc = r
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            (policy.on_5xx && code >= 500)
                || (policy.on_gateway_error && matches!(code, 502..=504))
                || policy.status_codes.contains(&code)
                || grpc.is_some_and(|g| policy.grpc_statuses.contains(&g))
        }
    }
}
