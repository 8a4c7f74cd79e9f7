//! Aggregated discovery: one stream per proxy carrying every type, state of
//! the world ([`sotw`]) or incremental ([`delta`]), both over the same
//! per-connection state ([`Connection`]): per type the names subscribed,
//! the nonce and version last sent, the version ACKed and the last NACK.
//!
//! A response goes out when the proxy subscribes or changes its names, and
//! when the generator's version for a type it watches moves and its
//! resources differ from what it was sent. A NACK is recorded and nothing
//! is resent until the config changes, so the proxy keeps its last good
//! config.

mod delta;
mod fields;
mod framing;
mod http2;
mod names;
mod response;
mod sotw;

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use component::{CancellationToken, limits::Limits};
use envoy_types::pb::envoy::config::core::v3::Node;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use self::{
    framing::{Decode, Requests},
    names::{NameList, NameSets},
    response::Response,
};
use super::{Generated, PUSH_ORDER, Resource, ResourceGenerator, ResourceSet, TypeVersions};
use opentelemetry::{KeyValue, trace::SpanContext};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The ADS service. Clones serve the same proxies' status, so one server
/// can listen on several ports (plaintext and mTLS).
pub struct AdsServer<G> {
    generator: Arc<G>,
    shutdown: CancellationToken,
    limits: Limits,
    status: SyncStatus,
    names: NameSets,
}

impl<G> Clone for AdsServer<G> {
    fn clone(&self) -> Self {
        Self {
            generator: self.generator.clone(),
            shutdown: self.shutdown.clone(),
            limits: self.limits.clone(),
            status: self.status.clone(),
            names: self.names.clone(),
        }
    }
}

/// Per connected proxy, what was sent, ACKed and NACKed, by stream.
#[derive(Clone, Default)]
pub struct SyncStatus {
    streams: Arc<Mutex<BTreeMap<u64, ProxyStatus>>>,
    next_id: Arc<AtomicU64>,
}

/// One proxy's stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStatus {
    pub node_id: String,
    /// What the proxy says it is (see [`proxy_version`]).
    pub version: Option<String>,
    /// Who the proxy is, when its node parses as a workload's.
    pub workload: Option<Arc<crate::proxy::Proxy>>,
    pub connected_since: Option<SystemTime>,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub types: BTreeMap<String, TypeStatus>,
}

/// One type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<String>,
}

impl SyncStatus {
    /// Every connected proxy's status.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<G: ResourceGenerator> AdsServer<G> {
    /// Serves what `generator` makes, bounded by `limits` on every
    /// listener it serves.
    pub fn new(generator: Arc<G>, shutdown: CancellationToken, limits: Limits) -> Self {
        Self {
            generator,
            shutdown,
            limits,
            status: SyncStatus::default(),
            names: NameSets::default(),
        }
    }

    /// What every connected proxy was sent and answered.
    pub fn status(&self) -> SyncStatus {
        self.status.clone()
    }

    /// Runs one stream of either flavour until the proxy leaves, the
    /// stream fails or Pilot shuts down.
    fn serve<F: Flavor<G>>(&self, mut requests: Requests<F::Decoder>) -> BoxStream<Response> {
        // At most one response per type is unanswered (see `Watch`), so a
        // few slots hold a stream's whole backlog.
        let (tx, rx) = mpsc::channel(PUSH_ORDER.len());
        let mut changes = self.generator.changes();
        let shutdown = self.shutdown.clone();
        let status = self.status.clone();
        let id = status.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conn = Connection {
            generator: self.generator.clone(),
            node_id: String::new(),
            version: None,
            workload: None,
            client: None,
            watches: BTreeMap::new(),
            responses: 0,
            seen: changes.borrow_and_update().clone(),
            connected_since: SystemTime::now(),
            names: self.names.clone(),
        };
        tokio::spawn(async move {
            let _gone = RemoveOnDrop(status.clone(), id);
            loop {
                // Requests first: what the proxy said shapes what a change
                // sends it.
                let responses = tokio::select! {
                    biased;
                    request = requests.next() => match request {
                        Some(Ok(request)) => match F::on_request(&mut conn, request) {
                            Ok(responses) => responses,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        },
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        None => return,
                    },
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let versions = changes.borrow_and_update().clone();
                        let types = conn.moved_types(versions);
                        F::on_change(&mut conn, &types)
                    }
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("pilot is shutting down"))).await;
                        return;
                    }
                };
                // Recorded before sending, so that what a proxy has received
                // is always in the status.
                if conn.client.is_some() {
                    status.lock().insert(id, conn.status(F::NAME));
                }
                for response in responses {
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// One side of the protocol: how requests are applied and what a change
/// sends.
trait Flavor<G: ResourceGenerator>: Send + 'static {
    const NAME: &'static str;
    type Decoder: Decode + Unpin;

    /// A stream's request decoder.
    fn decoder(server: &AdsServer<G>) -> Self::Decoder;

    fn on_request(
        conn: &mut Connection<G>,
        request: <Self::Decoder as Decode>::Request,
    ) -> Result<Vec<Response>, Status>;

    /// The response for `type_url`; `None` when it would repeat what the
    /// proxy holds, unless `forced`.
    fn respond(conn: &mut Connection<G>, type_url: &str, forced: bool) -> Option<Response>;

    /// Responses for the watched `types` whose resources may have changed.
    fn on_change(conn: &mut Connection<G>, types: &[String]) -> Vec<Response> {
        conn.pushable(types)
            .iter()
            .filter_map(|t| Self::respond(conn, t, false))
            .collect()
    }

    /// What follows a request for `type_url` once its subscriptions are
    /// applied: the proxy's answer to `nonce` (if it is one), the response
    /// the request calls for (`respond`: `Some(forced)`), then the types
    /// that waited on a pending response.
    fn after_request(
        conn: &mut Connection<G>,
        type_url: &str,
        nonce: &str,
        error: Option<String>,
        respond: Option<bool>,
    ) -> Vec<Response> {
        if !nonce.is_empty() {
            conn.answer(type_url, nonce, error);
        }
        let mut out = Vec::new();
        if let Some(forced) = respond {
            out.extend(Self::respond(conn, type_url, forced));
        }
        for t in conn.take_dirty() {
            out.extend(Self::respond(conn, &t, false));
        }
        out
    }
}

/// One type on one stream. Like MCP, at most one response per type is
/// unanswered: a change while one is pending marks the watch dirty, and
/// the answer (ACK or NACK) lets the latest state go out, so changes
/// coalesce for a slow proxy and Pilot buffers little for it.
#[derive(Default)]
struct Watch {
    /// Subscribed names; empty with `wildcard` for every resource.
    names: Arc<BTreeSet<String>>,
    /// SotW: the list that subscribed `names`, so that the ACKs that
    /// repeat it (Envoy's, with thousands of names) are known as one
    /// pointer.
    list: Option<Arc<NameList>>,
    wildcard: bool,
    /// Nonce, version and content hash of the last response.
    sent: Option<Sent>,
    /// Whether the last response awaits its answer.
    pending: bool,
    /// Whether resources may have changed while a response was pending.
    dirty: bool,
    acked: Option<String>,
    last_nack: Option<String>,
    /// What the proxy holds, for the types it keeps by name (delta: all;
    /// state of the world: endpoints and routes).
    held: Held,
}

/// What a proxy holds of one type.
enum Held {
    /// The generator's sets, as last sent: a pointer to each, so that a
    /// proxy's copy of thousands of resources costs two pointers.
    Sent(Generated),
    /// Known by name and content hash: what a delta client declared holding
    /// when it connected, or what was sent less what it has unsubscribed
    /// since.
    Listed(Arc<ResourceSet>),
}

impl Default for Held {
    fn default() -> Self {
        Self::Listed(ResourceSet::empty())
    }
}

/// What differs between what a proxy holds and what it should have.
struct Changes {
    /// New or changed resources, in parts.
    changed: Vec<Arc<ResourceSet>>,
    /// Names held and no longer there.
    removed: Vec<String>,
}

impl Held {
    /// Resources declared by name and content hash.
    fn declared(entries: impl IntoIterator<Item = (String, u64)>) -> Self {
        Self::Listed(ResourceSet::new(
            entries
                .into_iter()
                .map(|(name, hash)| Resource::declared(name, hash))
                .collect(),
        ))
    }

    /// What differs from this to `now`. Part by part when both are the
    /// generator's, so that the difference is the one the generator's sets
    /// worked out once for every proxy that holds them.
    fn diff(&self, now: &Generated) -> Changes {
        let held = match self {
            Held::Sent(held) => held,
            Held::Listed(held) => {
                let (changed, removed) = now.diff_from(held);
                let removed = removed.iter().map(|n| n.to_string()).collect();
                return Changes { changed, removed };
            }
        };
        let diffs = [
            now.shared.diff_from(&held.shared),
            now.own.diff_from(&held.own),
        ];
        Changes {
            changed: diffs
                .iter()
                .map(|d| d.changed.clone())
                .filter(|c| !c.is_empty())
                .collect(),
            // A name gone from one part but in the other is still there.
            removed: diffs
                .iter()
                .flat_map(|d| &d.removed)
                .filter(|n| !now.contains(n))
                .map(|n| n.to_string())
                .collect(),
        }
    }

    /// The proxy no longer holds `names`.
    fn forget<'a>(&mut self, names: impl IntoIterator<Item = &'a String>) {
        let this = &*self;
        let held = |name: &str| match this {
            Held::Sent(g) => g.contains(name),
            Held::Listed(s) => s.contains(name),
        };
        let names: BTreeSet<String> = names.into_iter().filter(|n| held(n)).cloned().collect();
        if names.is_empty() {
            return;
        }
        let all = match self {
            Held::Sent(g) => g.merged(),
            Held::Listed(s) => s.clone(),
        };
        *self = Held::Listed(all.without(&names));
    }
}

struct Sent {
    nonce: String,
    version: String,
    hash: u64,
    /// When it was sent, and the trace of the change it carries: its
    /// answer is a span of that trace, from sending to answer.
    at: SystemTime,
    trace: Option<SpanContext>,
}

impl Sent {
    /// The `n`th response of a stream, with content `hash`, carrying the
    /// generator's latest change: `n` is its version, and its nonce, with
    /// the change's trace when traced (see [`component::trace::nonce`]),
    /// so that a proxy that knows continues the trace.
    fn new<G: ResourceGenerator>(n: u64, hash: u64, generator: &G) -> Self {
        let trace = generator.trace();
        Sent {
            nonce: component::trace::nonce(n, trace.as_ref()),
            version: n.to_string(),
            hash,
            at: SystemTime::now(),
            trace,
        }
    }
}

impl Watch {
    /// Applies the answer to a response: `true` when it answers the latest
    /// one (an older nonce is stale and ignored).
    fn answer(&mut self, nonce: &str, error: Option<String>) -> bool {
        let Some(sent) = &self.sent else { return false };
        if sent.nonce != nonce {
            return false;
        }
        self.pending = false;
        match error {
            None => self.acked = Some(sent.version.clone()),
            Some(reason) => self.last_nack = Some(reason),
        }
        true
    }
}

/// What a proxy says it is: the `ISTIO_PROXY_VERSION` Istio's agent puts in
/// the node metadata, else the node's user agent (`mesh-proxy/0.1.0`,
/// `envoy/1.28.0`), as `istioctl proxy-status` shows it.
fn proxy_version(node: &Node) -> Option<String> {
    use envoy_types::pb::{
        envoy::config::core::v3::node::UserAgentVersionType, google::protobuf::value::Kind,
    };
    let istio = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(mesh_api::xds::metadata::PROXY_VERSION));
    if let Some(Kind::StringValue(version)) = istio.and_then(|v| v.kind.as_ref()) {
        return Some(version.clone());
    }
    let agent = match node.user_agent_version_type.as_ref()? {
        UserAgentVersionType::UserAgentVersion(v) => v.clone(),
        UserAgentVersionType::UserAgentBuildVersion(b) => {
            let v = b.version.unwrap_or_default();
            format!("{}.{}.{}", v.major_number, v.minor_number, v.patch)
        }
    };
    Some(match node.user_agent_name.as_str() {
        "" => agent,
        name => format!("{name}/{agent}"),
    })
}

/// A stream's state, shared by both flavours.
struct Connection<G: ResourceGenerator> {
    generator: Arc<G>,
    node_id: String,
    version: Option<String>,
    workload: Option<Arc<crate::proxy::Proxy>>,
    client: Option<G::Client>,
    watches: BTreeMap<String, Watch>,
    /// Responses sent on the stream; each one's number is its version and
    /// starts its nonce (see [`Sent::new`]), unique on the stream and
    /// increasing.
    responses: u64,
    /// The generator's versions as of the last push.
    seen: TypeVersions,
    connected_since: SystemTime,
    names: NameSets,
}

impl<G: ResourceGenerator> Connection<G> {
    /// Reads the proxy's identity from the first request that carries one.
    fn identify(&mut self, node: Option<&Node>) -> Result<(), Status> {
        if self.client.is_some() {
            return Ok(());
        }
        let node = node.ok_or_else(|| {
            Status::invalid_argument("the first request of a stream must carry the node")
        })?;
        let client = self
            .generator
            .client(node)
            .map_err(Status::invalid_argument)?;
        self.node_id = node.id.clone();
        self.version = proxy_version(node);
        self.workload = crate::proxy::Proxy::from_node(node).ok().map(Arc::new);
        self.client = Some(client);
        Ok(())
    }

    /// The next response on the stream, carrying the generator's latest
    /// change.
    fn next_sent(&mut self, hash: u64) -> Sent {
        self.responses += 1;
        Sent::new(self.responses, hash, &*self.generator)
    }

    /// The resources of a type for the watch's names; `None` before the
    /// proxy has said who it is or subscribed to the type.
    fn generate(&self, type_url: &str) -> Option<Generated> {
        static ALL: LazyLock<Arc<BTreeSet<String>>> = LazyLock::new(Arc::default);
        let (Some(client), Some(watch)) = (&self.client, self.watches.get(type_url)) else {
            return None;
        };
        let names = if watch.wildcard { &*ALL } else { &watch.names };
        Some(self.generator.generate(client, type_url, names))
    }

    /// Of a change's `types` (in push order), those that may go out now.
    /// A type with a response pending is marked dirty and sent on its
    /// answer; so are the types after it, so that push order holds.
    fn pushable(&mut self, types: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let mut blocked = false;
        for t in types {
            let Some(watch) = self.watches.get_mut(t) else {
                continue;
            };
            blocked |= watch.pending;
            if blocked {
                watch.dirty = true;
            } else {
                out.push(t.clone());
            }
        }
        out
    }

    /// After an answer: the dirty types that may go out now, in push order,
    /// up to the first one still pending.
    fn take_dirty(&mut self) -> Vec<String> {
        let mut types: Vec<String> = PUSH_ORDER
            .iter()
            .map(|t| t.to_string())
            .filter(|t| self.watches.contains_key(t))
            .collect();
        types.extend(
            self.watches
                .keys()
                .filter(|t| !PUSH_ORDER.contains(&t.as_str()))
                .cloned(),
        );
        let mut out = Vec::new();
        for t in types {
            let watch = self.watches.get_mut(&t).expect("listed from the watches");
            if !watch.dirty {
                continue;
            }
            if watch.pending {
                break;
            }
            watch.dirty = false;
            out.push(t);
        }
        out
    }

    /// Applies a proxy's answer to the response `nonce` of `type_url` (an
    /// ACK, or a NACK with its reason, which is logged); stale ones change
    /// nothing.
    fn answer(&mut self, type_url: &str, nonce: &str, error: Option<String>) {
        let Some(watch) = self.watches.get_mut(type_url) else {
            return;
        };
        if !watch.answer(nonce, error.clone()) {
            return;
        }
        if let Some(reason) = &error {
            tracing::warn!(%type_url, node = %self.node_id, %reason, "proxy NACKed");
        }
        if let Some(sent) = watch.sent.as_ref().filter(|s| s.trace.is_some()) {
            let kind = type_url.rsplit('.').next().unwrap_or(type_url);
            let span = component::trace::span(
                "pilot",
                format!("xds {kind} to ACK"),
                sent.trace.as_ref(),
                Some(sent.at),
                vec![
                    KeyValue::new("xds.node", self.node_id.clone()),
                    KeyValue::new("xds.type_url", type_url.to_string()),
                    KeyValue::new("xds.version", sent.version.clone()),
                    KeyValue::new("xds.acked", error.is_none()),
                ],
            );
            component::trace::end(&span, error.map(|e| format!("NACK: {e}")));
        }
    }

    /// The watched types whose version moved since the last push, in push
    /// order.
    fn moved_types(&mut self, versions: TypeVersions) -> Vec<String> {
        let moved: Vec<String> = versions
            .iter()
            .filter(|(t, v)| self.seen.get(*t) != Some(v))
            .map(|(t, _)| t.clone())
            .collect();
        self.seen = versions;
        let mut types: Vec<String> = PUSH_ORDER
            .iter()
            .filter(|t| moved.iter().any(|m| m == *t))
            .map(|t| t.to_string())
            .collect();
        types.extend(
            moved
                .iter()
                .filter(|m| !PUSH_ORDER.contains(&m.as_str()))
                .cloned(),
        );
        types.retain(|t| self.watches.contains_key(t));
        types
    }

    fn status(&self, protocol: &'static str) -> ProxyStatus {
        ProxyStatus {
            node_id: self.node_id.clone(),
            version: self.version.clone(),
            workload: self.workload.clone(),
            connected_since: Some(self.connected_since),
            protocol,
            types: self
                .watches
                .iter()
                .map(|(t, w)| {
                    let status = TypeStatus {
                        sent_version: w.sent.as_ref().map(|s| s.version.clone()),
                        sent_nonce: w.sent.as_ref().map(|s| s.nonce.clone()),
                        acked_version: w.acked.clone(),
                        last_nack: w.last_nack.clone(),
                    };
                    (t.clone(), status)
                })
                .collect(),
        }
    }
}

/// Forgets a stream's status when its task ends, however it ends.
struct RemoveOnDrop(SyncStatus, u64);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}
