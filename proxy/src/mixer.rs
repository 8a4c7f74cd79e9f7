//! The Mixer filter of inbound HTTP: before a request reaches the
//! application, a Check through the Mixer client library (cached by what
//! Mixer's decision read; quotas counted), and a denial answered with the
//! HTTP status its google.rpc code maps to, as Istio's filter does; when
//! the response body ends, a Report with Istio's standard attributes (the
//! size the body carried, the time to its last byte), batched and flushed
//! every second. Without a policy address no check is made;
//! without a telemetry address nothing is reported. Outbound requests carry
//! this workload's own attributes to the server-side proxy (Istio 1.1's
//! `x-istio-attributes`), which takes them from a caller proven by mesh
//! TLS, so that reports name the source workload, app and version.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine;
use clap::Args;
use component::CancellationToken;
use http::{HeaderMap, HeaderValue, StatusCode};
use mesh_api::pb::istio::mixer::v1::{
    Attributes,
    attributes::{AttributeValue, StringMap, attribute_value},
};
use mixer_client::{
    attributes::{Bag, Value},
    client::{Client, ClientOptions, Verdict},
};
use prost::Message;

use crate::config::listener::InboundService;

#[derive(Debug, Clone, Args)]
pub struct MixerArgs {
    /// The policy Mixer (istio-policy) that checks inbound requests.
    #[arg(long)]
    pub mixer_policy: Option<String>,
    /// The telemetry Mixer (istio-telemetry) that takes reports.
    #[arg(long)]
    pub mixer_telemetry: Option<String>,
    /// Let requests through when the policy Mixer cannot answer (Istio's
    /// default is to refuse them).
    #[arg(long)]
    pub mixer_fail_open: bool,
    /// Quotas every inbound check asks one of (Istio's `requestcount`).
    #[arg(long, value_delimiter = ',')]
    pub mixer_quota: Vec<String>,
    /// Times a check that cannot reach the policy Mixer is tried again
    /// (80 ms, doubling to 1 s) before failing open or closed.
    #[arg(long, default_value_t = 0)]
    pub mixer_check_retries: u32,
}

/// What the proxy knows of its own workload, for attributes.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `cluster.local/ns/<ns>/sa/<sa>`, as Istio 1.1 writes principals.
    pub principal: String,
}

pub struct MixerFilter {
    policy: Option<Client>,
    telemetry: Option<Arc<Client>>,
    workload: Workload,
    /// This workload's attributes for the servers it calls, with Mixer on.
    forwarded: Option<HeaderValue>,
}

/// The header that carries a caller's attributes to the server's proxy.
pub const FORWARDED_ATTRIBUTES: &str = "x-istio-attributes";

/// What a caller may say of itself; anything else in the header is
/// ignored (its namespace and principal come from its certificate).
const FORWARDABLE: [&str; 4] = [
    "source.uid",
    "source.workload.name",
    "source.workload.namespace",
    "source.labels",
];

impl Workload {
    /// The `x-istio-attributes` value naming this workload: a base64
    /// `istio.mixer.v1.Attributes`.
    fn forwarded(&self) -> Option<HeaderValue> {
        let string = |v: &str| AttributeValue {
            value: Some(attribute_value::Value::StringValue(v.to_string())),
        };
        let labels = StringMap {
            entries: self.labels.clone().into_iter().collect(),
        };
        let attributes = Attributes {
            attributes: [
                (
                    "source.uid",
                    string(&format!("kubernetes://{}.{}", self.name, self.namespace)),
                ),
                ("source.workload.name", string(&self.name)),
                ("source.workload.namespace", string(&self.namespace)),
                (
                    "source.labels",
                    AttributeValue {
                        value: Some(attribute_value::Value::StringMapValue(labels)),
                    },
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        let text = base64::engine::general_purpose::STANDARD.encode(attributes.encode_to_vec());
        HeaderValue::from_str(&text).ok()
    }
}

/// The forwardable attributes in a caller's header, if they decode and
/// name `namespace` (the one its certificate proves) as theirs.
fn forwarded(headers: &HeaderMap, namespace: &str) -> Bag {
    let decoded = headers
        .get(FORWARDED_ATTRIBUTES)
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .ok()
        })
        .and_then(|bytes| Attributes::decode(bytes.as_slice()).ok());
    let Some(mut attributes) = decoded else {
        return Bag::new();
    };
    let claimed = attributes
        .attributes
        .get("source.workload.namespace")
        .and_then(|v| match &v.value {
            Some(attribute_value::Value::StringValue(ns)) => Some(ns.as_str()),
            _ => None,
        });
    if claimed != Some(namespace) {
        return Bag::new();
    }
    FORWARDABLE
        .iter()
        .filter_map(|name| {
            let value = match attributes.attributes.remove(*name)?.value? {
                attribute_value::Value::StringValue(v) => Value::String(v),
                attribute_value::Value::StringMapValue(m) => {
                    Value::StringMap(m.entries.into_iter().collect())
                }
                _ => return None,
            };
            Some((name.to_string(), value))
        })
        .collect()
}

/// The request side of one inbound request, kept for its report.
pub struct Inbound {
    bag: Bag,
    started: SystemTime,
    /// The request's W3C trace context, which its Check carries.
    traceparent: Option<String>,
}

impl MixerFilter {
    pub fn new(args: &MixerArgs, workload: Workload) -> anyhow::Result<Self> {
        let channel = |addr: &str| -> anyhow::Result<tonic::transport::Channel> {
            Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy(),
            )
        };
        let policy = args
            .mixer_policy
            .as_deref()
            .map(|addr| -> anyhow::Result<Client> {
                let options = ClientOptions {
                    fail_open: args.mixer_fail_open,
                    quotas: args.mixer_quota.clone(),
                    retries: args.mixer_check_retries,
                    ..Default::default()
                };
                Ok(Client::new(channel(addr)?, options))
            })
            .transpose()?;
        let telemetry = args
            .mixer_telemetry
            .as_deref()
            .map(|addr| -> anyhow::Result<Arc<Client>> {
                Ok(Arc::new(Client::new(
                    channel(addr)?,
                    ClientOptions::default(),
                )))
            })
            .transpose()?;
        let on = policy.is_some() || telemetry.is_some();
        Ok(Self {
            policy,
            telemetry,
            forwarded: on.then(|| workload.forwarded()).flatten(),
            workload,
        })
    }

    /// What outbound requests tell the servers' proxies of this workload.
    pub fn forwarded_attributes(&self) -> Option<&HeaderValue> {
        self.forwarded.as_ref()
    }

    /// Whether there is a Mixer to check with or report to.
    pub fn is_on(&self) -> bool {
        self.policy.is_some() || self.telemetry.is_some()
    }

    /// Sends queued reports every second until `shutdown`, and once more then.
    pub async fn flush_reports(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(telemetry) = &self.telemetry else {
            return;
        };
        loop {
            let stop = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            if let Err(e) = telemetry.flush().await {
                tracing::debug!("reports not sent: {e}");
            }
            if stop {
                return;
            }
        }
    }

    /// The attributes of a request arriving for `service_host`.
    /// What is known of a connection arriving for `service_host`: the
    /// caller's address and identity, this workload as the destination.
    fn connection(
        &self,
        peer: SocketAddr,
        peer_identity: Option<&str>,
        service_host: &str,
        port: u16,
        protocol: &str,
    ) -> Bag {
        let s = |v: &str| Value::String(v.to_string());
        let ip = match peer.ip() {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let w = &self.workload;
        let mut bag = Bag::from([
            ("context.reporter.kind".into(), s("inbound")),
            ("context.protocol".into(), s(protocol)),
            ("source.ip".into(), Value::Bytes(ip)),
            ("destination.service.host".into(), s(service_host)),
            ("destination.port".into(), Value::Int64(i64::from(port))),
            ("destination.workload.name".into(), s(&w.name)),
            ("destination.workload.namespace".into(), s(&w.namespace)),
            ("destination.namespace".into(), s(&w.namespace)),
            (
                "destination.labels".into(),
                Value::StringMap(w.labels.clone()),
            ),
            ("destination.principal".into(), s(&w.principal)),
            (
                "connection.mtls".into(),
                Value::Bool(peer_identity.is_some()),
            ),
        ]);
        if let Some(name) = service_host.split('.').next() {
            bag.insert("destination.service.name".into(), s(name));
        }
        if let Some(ns) = service_host.split('.').nth(1) {
            bag.insert("destination.service.namespace".into(), s(ns));
        }
        if let Some(principal) = peer_identity {
            let principal = principal.strip_prefix("spiffe://").unwrap_or(principal);
            bag.insert("source.principal".into(), s(principal));
            bag.insert("source.user".into(), s(principal));
            // The caller's namespace is in its identity.
            if let Some(ns) = principal
                .split("/ns/")
                .nth(1)
                .and_then(|r| r.split('/').next())
            {
                bag.insert("source.namespace".into(), s(ns));
            }
        }
        bag
    }

    /// The attributes of a request arriving for `service_host`.
    pub fn inbound<B>(
        &self,
        parts: &http::Request<B>,
        peer: SocketAddr,
        peer_identity: Option<&str>,
        service_host: &str,
        port: u16,
    ) -> Inbound {
        let s = |v: &str| Value::String(v.to_string());
        let now = SystemTime::now();
        let path = parts.uri().path_and_query().map_or("/", |p| p.as_str());
        let host = parts
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or(parts.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default();
        let grpc = parts
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let protocol = if grpc { "grpc" } else { "http" };
        let mut bag = self.connection(peer, peer_identity, service_host, port, protocol);
        // What a caller proven by mesh TLS says of itself.
        if let Some(Value::String(namespace)) = bag.get("source.namespace") {
            let from_caller = forwarded(parts.headers(), namespace);
            bag.extend(from_caller);
        }
        bag.extend([
            ("request.path".into(), s(path)),
            ("request.host".into(), s(host)),
            ("request.method".into(), s(parts.method().as_str())),
            ("request.scheme".into(), s("http")),
            (
                "request.headers".into(),
                Value::StringMap(headers(parts.headers())),
            ),
            ("request.time".into(), Value::Timestamp(timestamp(now))),
        ]);
        if let Some(agent) = parts
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
        {
            bag.insert("request.useragent".into(), s(agent));
        }
        // What the end user's token proved (the JWT stage).
        if let Some(user) = parts.extensions().get::<crate::http::jwt::EndUser>() {
            bag.insert("request.auth.principal".into(), s(&user.principal()));
            bag.insert(
                "request.auth.audiences".into(),
                s(&user.audiences.join(",")),
            );
            if let Some(presenter) = &user.presenter {
                bag.insert("request.auth.presenter".into(), s(presenter));
            }
            bag.insert(
                "request.auth.claims".into(),
                Value::StringMap(user.claims.clone()),
            );
        }
        let traceparent = parts
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        Inbound {
            bag,
            started: now,
            traceparent,
        }
    }

    /// `Some(response)` when Mixer refuses the request.
    pub async fn check(&self, inbound: &Inbound) -> Option<(StatusCode, String)> {
        let policy = self.policy.as_ref()?;
        match policy
            .check_in(&inbound.bag, inbound.traceparent.as_deref())
            .await
        {
            Verdict::Allow => None,
            Verdict::Deny { code, message } => {
                let (status, name) = http_status(code);
                Some((status, format!("{name}:{message}")))
            }
        }
    }

    /// Queues the report of a finished request.
    fn report(&self, inbound: Inbound, status: StatusCode, request_size: u64, response_size: u64) {
        let Some(telemetry) = &self.telemetry else {
            return;
        };
        let now = SystemTime::now();
        let mut bag = inbound.bag;
        let took = now.duration_since(inbound.started).unwrap_or_default();
        bag.extend([
            (
                "response.code".into(),
                Value::Int64(i64::from(status.as_u16())),
            ),
            ("response.size".into(), Value::Int64(response_size as i64)),
            ("request.size".into(), Value::Int64(request_size as i64)),
            ("response.time".into(), Value::Timestamp(timestamp(now))),
            (
                "response.duration".into(),
                Value::Duration(pbjson_types::Duration {
                    seconds: took.as_secs() as i64,
                    nanos: took.subsec_nanos() as i32,
                }),
            ),
        ]);
        queue_report(telemetry, bag);
    }
}

impl crate::http::mixer::Mixer for MixerFilter {
    type Attributes = Inbound;

    fn attributes(
        &self,
        request: &crate::http::Request,
        connection: &crate::http::Connection,
        service: &InboundService,
    ) -> Inbound {
        self.inbound(
            request,
            connection.peer,
            connection.peer_identity.as_deref(),
            &service.host,
            service.port,
        )
    }

    async fn check(&self, attributes: &Inbound) -> Option<(StatusCode, String)> {
        MixerFilter::check(self, attributes).await
    }

    fn checks(&self) -> bool {
        self.policy.is_some()
    }

    fn reports(&self) -> bool {
        self.telemetry.is_some()
    }

    fn report(&self, inbound: Inbound, status: StatusCode, request_size: u64, sent: u64) {
        MixerFilter::report(self, inbound, status, request_size, sent)
    }
}

/// Queues `bag` for the telemetry Mixer; a task sends the batch once it
/// is full, rather than one task a request.
fn queue_report(telemetry: &Arc<Client>, bag: Bag) {
    if telemetry.queue(bag) {
        let telemetry = telemetry.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry.flush().await {
                tracing::debug!("reports not sent: {e}");
            }
        });
    }
}

/// What one inbound TCP connection carried, for its report.
pub struct TcpConnection<'a> {
    pub peer: SocketAddr,
    pub peer_identity: Option<&'a str>,
    pub service_host: &'a str,
    pub port: u16,
    /// Bytes from the caller, and to it.
    pub received: u64,
    pub sent: u64,
    pub duration: Duration,
}

impl MixerFilter {
    /// Queues the report of a finished inbound TCP connection.
    pub fn report_tcp(&self, c: &TcpConnection) {
        let Some(telemetry) = &self.telemetry else {
            return;
        };
        let mut bag = self.connection(c.peer, c.peer_identity, c.service_host, c.port, "tcp");
        bag.extend([
            (
                "connection.received.bytes".into(),
                Value::Int64(c.received as i64),
            ),
            ("connection.sent.bytes".into(), Value::Int64(c.sent as i64)),
            (
                "connection.duration".into(),
                Value::Duration(pbjson_types::Duration {
                    seconds: c.duration.as_secs() as i64,
                    nanos: c.duration.subsec_nanos() as i32,
                }),
            ),
            ("connection.event".into(), Value::String("close".into())),
        ]);
        queue_report(telemetry, bag);
    }
}

fn headers(map: &HeaderMap) -> BTreeMap<String, String> {
    map.iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// The HTTP status a google.rpc code becomes, and the code's name.
fn http_status(code: i32) -> (StatusCode, &'static str) {
    match code {
        1 => (
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "CANCELLED",
        ),
        3 => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        4 => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        5 => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        6 => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        7 => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        8 => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        9 => (StatusCode::BAD_REQUEST, "FAILED_PRECONDITION"),
        10 => (StatusCode::CONFLICT, "ABORTED"),
        11 => (StatusCode::BAD_REQUEST, "OUT_OF_RANGE"),
        12 => (StatusCode::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        14 => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        15 => (StatusCode::INTERNAL_SERVER_ERROR, "DATA_LOSS"),
        16 => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        13 => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviews() -> Workload {
        Workload {
            name: "reviews-v2-0".into(),
            namespace: "bookinfo".into(),
            labels: BTreeMap::from([
                ("app".into(), "reviews".into()),
                ("version".into(), "v2".into()),
            ]),
            principal: "cluster.local/ns/bookinfo/sa/bookinfo-reviews".into(),
        }
    }

    fn headers(value: HeaderValue) -> HeaderMap {
        HeaderMap::from_iter([(http::HeaderName::from_static(FORWARDED_ATTRIBUTES), value)])
    }

    #[test]
    fn a_callers_attributes_arrive_when_its_namespace_is_the_proven_one() {
        let sent = headers(reviews().forwarded().unwrap());
        let got = forwarded(&sent, "bookinfo");
        assert_eq!(
            got.get("source.workload.name"),
            Some(&Value::String("reviews-v2-0".into()))
        );
        assert_eq!(
            got.get("source.uid"),
            Some(&Value::String("kubernetes://reviews-v2-0.bookinfo".into()))
        );
        let Some(Value::StringMap(labels)) = got.get("source.labels") else {
            panic!("no labels: {got:?}");
        };
        assert_eq!(labels["version"], "v2");
        // Claiming another namespace than the certificate's: nothing.
        assert!(forwarded(&sent, "shop").is_empty());
        // Garbage: nothing.
        assert!(forwarded(&headers(HeaderValue::from_static("%%%")), "bookinfo").is_empty());
    }

    #[test]
    fn only_what_a_caller_may_say_of_itself_is_taken() {
        let mut attributes = Attributes::default();
        for (name, value) in [
            ("source.workload.namespace", "bookinfo"),
            ("source.workload.name", "productpage-v1-0"),
            ("destination.principal", "spoofed"),
            ("source.principal", "spoofed"),
        ] {
            attributes.attributes.insert(
                name.into(),
                AttributeValue {
                    value: Some(attribute_value::Value::StringValue(value.into())),
                },
            );
        }
        let text = base64::engine::general_purpose::STANDARD.encode(attributes.encode_to_vec());
        let got = forwarded(&headers(HeaderValue::from_str(&text).unwrap()), "bookinfo");
        let names: Vec<&String> = got.keys().collect();
        assert_eq!(names, ["source.workload.name", "source.workload.namespace"]);
    }
}
