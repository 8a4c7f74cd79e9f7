//! The sink side of MCP: what a sink holds, how it applies `Resources`, and
//! one stream's exchange, whichever side dialled.
//!
//! Every body is decoded to its collection's type before anything is
//! applied; an update that cannot be applied whole is NACKed with a reason
//! and the last good state is kept. Components read the held state as a
//! stream of consistent [`SinkSnapshot`]s.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use crate::McpMetrics;
use mesh_api::{
    kinds::{self, Body},
    pb::{
        google::rpc,
        istio::mcp::v1alpha1::{Metadata, RequestResources, Resources, SinkNode},
    },
};

/// What a sink asks for.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Identifies this sink to sources (`SinkNode.id`).
    pub id: String,
    pub annotations: BTreeMap<String, String>,
    pub collections: Vec<String>,
    /// Collections asked for only while the source refuses another: a
    /// collection, and what stands in for it (Pilot asks for the raw
    /// Kubernetes objects when a source serves no synthetic service
    /// entries).
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Ask for incremental updates (MCP rule 5).
    pub incremental: bool,
}

impl SinkOptions {
    pub fn new(
        id: impl Into<String>,
        collections: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            id: id.into(),
            annotations: BTreeMap::new(),
            collections: collections.into_iter().map(Into::into).collect(),
            fallbacks: BTreeMap::new(),
            incremental: true,
        }
    }
}

/// A resource as the sink holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkResource {
    pub metadata: Metadata,
    /// The body as it came, byte for byte: what a relay serves on, fields
    /// this project has no name for included.
    pub body: pbjson_types::Any,
    pub payload: Payload,
}

/// A body decoded to its collection's type, or not decoded: a collection
/// this project has no type for.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Decoded(Body),
    Opaque,
}

/// One collection as held by the sink.
#[derive(Debug, Clone, Default)]
pub struct HeldCollection {
    /// `system_version_info` of the last applied response.
    pub version: String,
    /// Whether a first response has been applied.
    pub synced: bool,
    /// Why the source refused the collection, if it did: the collection is
    /// absent from that source, which is not the same as empty. What was
    /// held before stays held.
    pub refused: Option<String>,
    /// The collection this one stands in for, if it is a fallback: it is
    /// asked for, and must sync, only while that one is refused.
    pub fallback_for: Option<String>,
    pub resources: imbl::OrdMap<String, Arc<SinkResource>>,
}

impl HeldCollection {
    /// Whether the sink has heard from the source about this collection:
    /// a first response, or a refusal.
    pub fn settled(&self) -> bool {
        self.synced || self.refused.is_some()
    }
}

/// Everything the sink holds, as of one moment. Cloning is cheap: maps are
/// persistent and share structure between snapshots.
#[derive(Debug, Clone, Default)]
pub struct SinkSnapshot {
    pub collections: BTreeMap<String, HeldCollection>,
    /// The span the last update was applied in, when its source traced it
    /// (see [`component::trace::nonce`]): the trace what the sink makes of
    /// it continues.
    pub trace: Option<opentelemetry::trace::SpanContext>,
}

impl SinkSnapshot {
    /// What a sink would hold had it been sent `objects`, each in its
    /// collection: for tests of what components make of a snapshot.
    pub fn from_objects(objects: impl IntoIterator<Item = mesh_api::object::ConfigObject>) -> Self {
        let mut snapshot = Self::default();
        for o in objects {
            let collection = o.kind.collection;
            snapshot.put(collection, o);
        }
        snapshot
    }

    /// Holds `object` in `collection` (its own, or one that carries the
    /// same type), as a sink does once sent it: for tests that change a
    /// snapshot an object at a time.
    pub fn put(&mut self, collection: &str, object: mesh_api::object::ConfigObject) {
        let held = self.collections.entry(collection.to_string()).or_default();
        held.synced = true;
        let name = object.mcp_name();
        let body = object.to_resource().body.unwrap_or_default();
        let resource = SinkResource {
            metadata: Metadata {
                name: name.clone(),
                ..Metadata::default()
            },
            body,
            payload: Payload::Decoded(object.body),
        };
        held.resources.insert(name, Arc::new(resource));
    }

    /// True once every requested collection has had a first response or
    /// was refused by the source.
    pub fn synced(&self) -> bool {
        self.collections
            .values()
            .filter(|c| self.asked(c))
            .all(HeldCollection::settled)
    }

    /// Whether `held` is asked for now: a fallback only while the
    /// collection it stands in for is refused.
    fn asked(&self, held: &HeldCollection) -> bool {
        held.fallback_for.as_deref().is_none_or(|p| self.absent(p))
    }

    /// Whether the source refused `collection` (it does not serve it).
    pub fn absent(&self, collection: &str) -> bool {
        self.collections
            .get(collection)
            .is_some_and(|c| c.refused.is_some())
    }

    /// The refused collections, with the source's reasons.
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.collections
            .iter()
            .filter_map(|(name, c)| Some((name.as_str(), c.refused.as_deref()?)))
    }

    /// The decoded bodies of one collection, with their namespaces (empty
    /// for cluster-scoped kinds) and names.
    pub fn bodies<'a>(
        &'a self,
        collection: &str,
    ) -> impl Iterator<Item = (String, String, &'a Body)> + 'a {
        self.collections
            .get(collection)
            .into_iter()
            .flat_map(|held| held.resources.iter())
            .filter_map(|(name, resource)| match &resource.payload {
                Payload::Decoded(body) => {
                    let (ns, name) = match name.split_once('/') {
                        Some((ns, name)) => (ns.to_string(), name.to_string()),
                        None => (String::new(), name.to_string()),
                    };
                    Some((ns, name, body))
                }
                Payload::Opaque => None,
            })
    }
}

/// A sink's state, shared by all streams that feed it.
pub struct Sink {
    options: SinkOptions,
    held: Mutex<SinkSnapshot>,
    snapshots: watch::Sender<Arc<SinkSnapshot>>,
    metrics: McpMetrics,
}

impl Sink {
    pub fn new(options: SinkOptions, metrics: McpMetrics) -> Self {
        let fallbacks = options.fallbacks.iter().flat_map(|(primary, standins)| {
            standins.iter().map(|c| {
                let held = HeldCollection {
                    fallback_for: Some(primary.clone()),
                    ..HeldCollection::default()
                };
                (c.clone(), held)
            })
        });
        let held = SinkSnapshot {
            collections: options
                .collections
                .iter()
                .map(|c| (c.clone(), HeldCollection::default()))
                .chain(fallbacks)
                .collect(),
            trace: None,
        };
        let (snapshots, _) = watch::channel(Arc::new(held.clone()));
        Self {
            options,
            held: Mutex::new(held),
            snapshots,
            metrics,
        }
    }

    /// The latest snapshot, and every later one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SinkSnapshot>> {
        self.snapshots.subscribe()
    }

    /// Keeps `ready` equal to "every collection has had a first response
    /// or was refused", with the refused ones named in its note. Returns
    /// when the sink is dropped.
    pub async fn track_synced(&self, ready: component::readiness::Condition) {
        let mut snapshots = self.subscribe();
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            let refused: Vec<&str> = snapshot.refused().map(|(c, _)| c).collect();
            ready.note((!refused.is_empty()).then(|| {
                format!(
                    "absent, the source does not serve them: {}",
                    refused.join(", ")
                )
            }));
            ready.set(snapshot.synced());
            if snapshots.changed().await.is_err() {
                return;
            }
        }
    }

    /// The requests that open a stream: one per collection, with the
    /// versions already held so that the source can send only a diff.
    /// Collections the source refused are left out unless `ask_refused`
    /// (a new source may serve them); fallbacks are asked for while what
    /// they stand in for is refused.
    pub fn initial_requests(&self, ask_refused: bool) -> Vec<RequestResources> {
        let held = self.lock();
        held.collections
            .iter()
            .filter(|(c, h)| match &h.fallback_for {
                None => ask_refused || !held.absent(c),
                Some(_) => held.asked(h) && !held.absent(c),
            })
            .map(|(c, _)| c)
            .map(|c| {
                let initial_resource_versions = if self.options.incremental {
                    held.collections
                        .get(c)
                        .map(|h| {
                            h.resources
                                .iter()
                                .map(|(n, r)| (n.clone(), r.metadata.version.clone()))
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    BTreeMap::new()
                };
                RequestResources {
                    sink_node: Some(self.node()),
                    collection: c.clone(),
                    initial_resource_versions,
                    incremental: self.options.incremental,
                    ..RequestResources::default()
                }
            })
            .collect()
    }

    /// Applies one `Resources` message whole or not at all, and returns the
    /// ACK or NACK to send back. A collection this sink did not ask for is
    /// NACKed `UNIMPLEMENTED`, as Istio 1.1's sinks do; quietly for no
    /// collection at all, Istio 1.1's dial-out trigger ([`is_trigger`]).
    pub fn apply(&self, resources: Resources) -> RequestResources {
        if is_trigger(&resources) {
            tracing::debug!("answering a dialling source's trigger");
            return RequestResources {
                sink_node: Some(self.node()),
                response_nonce: resources.nonce,
                error_detail: Some(rpc::Status {
                    code: Code::Unimplemented as i32,
                    message: "no collection named: a trigger, answered".into(),
                    details: Vec::new(),
                }),
                ..RequestResources::default()
            };
        }
        let collection = resources.collection.clone();
        let nonce = resources.nonce.clone();
        let span = match component::trace::of_nonce(&nonce) {
            Some(push) => component::trace::span(
                "mcp",
                format!("mcp apply {collection}"),
                Some(&push),
                None,
                vec![opentelemetry::KeyValue::new(
                    "mcp.resources",
                    resources.resources.len() as i64,
                )],
            ),
            None => opentelemetry::Context::new(),
        };
        let result = {
            let mut held = self.lock();
            let applied = apply_to(&mut held, resources);
            if applied.is_ok() {
                if let Some(applied) = component::trace::context_of(&span) {
                    held.trace = Some(applied);
                }
                let snapshot = Arc::new(held.clone());
                if let Some(c) = held.collections.get(&collection) {
                    self.metrics.resources_held(&collection, c.resources.len());
                }
                self.metrics.refused(&collection, false);
                self.snapshots.send_replace(snapshot);
            }
            applied
        };
        let error_detail = match result {
            Ok(()) => {
                component::trace::end(&span, None);
                self.metrics.ack(&collection);
                None
            }
            Err(status) => {
                component::trace::end(&span, Some(status.message().to_string()));
                tracing::warn!(%collection, %nonce, error = %status.message(), "NACKing MCP update");
                self.metrics.nack(&collection);
                Some(rpc::Status {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    details: Vec::new(),
                })
            }
        };
        RequestResources {
            sink_node: Some(self.node()),
            collection,
            response_nonce: nonce,
            error_detail,
            incremental: self.options.incremental,
            ..RequestResources::default()
        }
    }

    /// Takes the end of a stream: if the source ended it because it does not
    /// serve a collection (MCP rule 6: `InvalidArgument` naming the
    /// collection, as Istio 1.1's Galley does for the synthetic service
    /// entries and the mesh config), marks that collection absent and
    /// returns it, so that the next stream leaves it out.
    pub fn refusal(&self, status: &Status) -> Option<String> {
        if status.code() != Code::InvalidArgument {
            return None;
        }
        let mut held = self.lock();
        let quoted = |c: &str| status.message().contains(&format!("{c:?}"));
        let named = |c: &str| status.message().contains(c);
        // Prefer an exact quoted match: one collection's name can be a
        // prefix of another's.
        let collection = held
            .collections
            .keys()
            .find(|c| quoted(c))
            .or_else(|| held.collections.keys().find(|c| named(c)))?
            .clone();
        let entry = held.collections.entry(collection.clone()).or_default();
        if entry.refused.is_some() {
            // Refused again: nothing new to publish.
            return Some(collection);
        }
        entry.refused = Some(status.message().to_string());
        tracing::warn!(%collection, reason = %status.message(), "MCP source does not serve a collection; treating it as absent");
        self.metrics.refused(&collection, true);
        self.snapshots.send_replace(Arc::new(held.clone()));
        Some(collection)
    }

    fn node(&self) -> SinkNode {
        SinkNode {
            id: self.options.id.clone(),
            annotations: self.options.annotations.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkSnapshot> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn apply_to(held: &mut SinkSnapshot, msg: Resources) -> Result<(), Status> {
    let Some(current) = held.collections.get(&msg.collection) else {
        return Err(Status::unimplemented(format!(
            "collection {:?} was not requested by this sink",
            msg.collection
        )));
    };
    let kind = kinds::by_collection(&msg.collection);
    let mut seen = HashSet::new();
    let mut decoded = Vec::with_capacity(msg.resources.len());
    for (i, resource) in msg.resources.into_iter().enumerate() {
        let metadata = resource.metadata.unwrap_or_default();
        if metadata.name.is_empty() {
            return Err(invalid(format!("resource #{i} has no metadata.name")));
        }
        if !seen.insert(metadata.name.clone()) {
            return Err(invalid(format!(
                "resource {:?} appears twice",
                metadata.name
            )));
        }
        let Some(body) = resource.body else {
            return Err(invalid(format!("resource {:?} has no body", metadata.name)));
        };
        let payload = match kind {
            Some(kind) => {
                let want = kind.body.type_url();
                // An Any names its message by the last segment of its type
                // URL, whatever precedes it (Istio 1.1's legacy kinds come
                // with one prefix or two).
                let message = |url: &str| url.rsplit('/').next().unwrap_or_default().to_string();
                if message(&body.type_url) != message(want) {
                    return Err(invalid(format!(
                        "resource {:?}: body type {:?}, want {want:?}",
                        metadata.name, body.type_url
                    )));
                }
                let decoded = kind.body.decode(&body.value).map_err(|e| {
                    invalid(format!(
                        "resource {:?}: cannot decode {want}: {e}",
                        metadata.name
                    ))
                })?;
                Payload::Decoded(decoded)
            }
            None => Payload::Opaque,
        };
        decoded.push(Arc::new(SinkResource {
            metadata,
            body,
            payload,
        }));
    }

    let mut next = if msg.incremental {
        current.resources.clone()
    } else {
        imbl::OrdMap::new()
    };
    if msg.incremental {
        for name in &msg.removed_resources {
            next.remove(name);
        }
    }
    for r in decoded {
        next.insert(r.metadata.name.clone(), r);
    }
    let held = held
        .collections
        .get_mut(&msg.collection)
        .expect("checked above");
    held.version = msg.system_version_info;
    held.synced = true;
    held.refused = None;
    held.resources = next;
    Ok(())
}

fn invalid(message: String) -> Status {
    Status::new(Code::InvalidArgument, message)
}

/// Runs one stream from the sink side: sends the opening requests, then
/// answers every `Resources` with an ACK or NACK. `responses` resolves to
/// the source's stream once its response headers arrive; the opening
/// requests go out while that is awaited, because a grpc-go source sends
/// no headers before its first response, and no response before a request.
/// A stream error (such as a message that does not decode) is sent to
/// `requests` as the final status. Returns how the stream ended and whether
/// any response arrived (for the caller's backoff).
pub async fn run_stream<S>(
    sink: &Sink,
    responses: impl Future<Output = Result<S, Status>>,
    requests: mpsc::Sender<Result<RequestResources, Status>>,
    ask_refused: bool,
) -> (Result<(), Status>, bool)
where
    S: Stream<Item = Result<Resources, Status>> + Unpin,
{
    let mut received = false;
    let opening = sink.initial_requests(ask_refused);
    let asked: Vec<String> = opening.iter().map(|r| r.collection.clone()).collect();
    for c in &asked {
        sink.metrics.stream_opened(c);
    }
    let result = async {
        let opening = async {
            for request in opening {
                requests.send(Ok(request)).await.map_err(|_| ())?;
            }
            Ok::<_, ()>(())
        };
        let (opened, responses) = tokio::join!(opening, responses);
        let mut responses = responses?;
        if opened.is_err() {
            return Err(ended(&mut responses).await);
        }
        while let Some(message) = responses.next().await {
            let message = message?;
            received = true;
            sink.metrics
                .response(&message.collection, message.encoded_len());
            let answer = sink.apply(message);
            if requests.send(Ok(answer)).await.is_err() {
                return Err(ended(&mut responses).await);
            }
        }
        Ok::<_, Status>(())
    }
    .await;
    if let Err(status) = &result {
        // The source learns why (a server sends it as the stream's status).
        let _ = requests.send(Err(status.clone())).await;
    }
    for c in &asked {
        sink.metrics.stream_closed(c);
    }
    (result, received)
}

/// Istio 1.1's Galley opens a stream it dials (`--sinkAddress`) with a
/// `Resources` of no collection, and takes the stream only if the sink's
/// first message is a NACK of it with code `UNIMPLEMENTED`; otherwise it
/// dials again a second later, forever.
pub fn is_trigger(resources: &Resources) -> bool {
    resources.collection.is_empty()
}

/// Why a stream whose request half closed ended: the status the source
/// sent (a refused collection, say). Responses already on their way come
/// first and cannot be answered; Istio 1.1's Galley sends the collections it
/// serves before it refuses one.
async fn ended<S>(responses: &mut S) -> Status
where
    S: Stream<Item = Result<Resources, Status>> + Unpin,
{
    while let Some(message) = responses.next().await {
        if let Err(status) = message {
            return status;
        }
    }
    Status::cancelled("stream closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_after_responses_already_sent_is_still_read() {
        let refusal = Status::invalid_argument("unsupported collection \"k8s/core/v1/namespaces\"");
        let mut responses = tokio_stream::iter([
            Ok(Resources::default()),
            Ok(Resources::default()),
            Err(refusal.clone()),
        ]);
        let status = ended(&mut responses).await;
        assert_eq!(
            (status.code(), status.message()),
            (refusal.code(), refusal.message())
        );
        let mut closed = tokio_stream::iter([Ok::<_, Status>(Resources::default())]);
        assert_eq!(ended(&mut closed).await.code(), Code::Cancelled);
    }

    const PRIMARY: &str = "istio/networking/v1alpha3/synthetic/serviceentries";
    const STANDIN: &str = "k8s/core/v1/services";
    const OTHER: &str = "istio/networking/v1alpha3/gateways";

    fn asked(sink: &Sink, ask_refused: bool) -> Vec<String> {
        sink.initial_requests(ask_refused)
            .into_iter()
            .map(|r| r.collection)
            .collect()
    }

    fn answer(collection: &str) -> Resources {
        Resources {
            collection: collection.into(),
            nonce: "1".into(),
            ..Resources::default()
        }
    }

    #[test]
    fn a_refused_collection_is_absent_and_its_fallbacks_are_asked_instead() {
        let mut options = SinkOptions::new("test", [OTHER, PRIMARY]);
        options.fallbacks = [(PRIMARY.to_string(), vec![STANDIN.to_string()])].into();
        let sink = Sink::new(options, McpMetrics::default());
        assert_eq!(asked(&sink, false), [OTHER, PRIMARY], "no fallback yet");

        let refusal = Status::invalid_argument(format!("unsupported collection {PRIMARY:?}"));
        assert_eq!(sink.refusal(&refusal).as_deref(), Some(PRIMARY));
        assert_eq!(asked(&sink, false), [OTHER, STANDIN]);
        assert_eq!(
            asked(&sink, true),
            [OTHER, PRIMARY, STANDIN],
            "a new source may serve it"
        );
        assert!(
            sink.refusal(&Status::invalid_argument("no reason given"))
                .is_none()
        );
        assert!(sink.refusal(&Status::unavailable(PRIMARY)).is_none());

        let snapshot = || sink.subscribe().borrow().clone();
        sink.apply(answer(OTHER));
        assert!(snapshot().absent(PRIMARY));
        assert!(!snapshot().synced(), "the fallback must sync too");
        sink.apply(answer(STANDIN));
        assert!(snapshot().synced());
        assert_eq!(snapshot().refused().count(), 1);

        // A source that serves it again: present, and the fallback is no
        // longer needed to be synced.
        sink.apply(answer(PRIMARY));
        assert!(!snapshot().absent(PRIMARY));
        assert!(snapshot().synced());
    }

    /// Istio 1.1.17's Galley sends a legacy kind's Struct under the plain
    /// type URL, though its registry names a doubled one; either is the
    /// same message.
    #[test]
    fn a_body_type_is_matched_by_message_name() {
        const METRICS: &str = "istio/config/v1alpha2/legacy/metrics";
        let sink = Sink::new(SinkOptions::new("test", [METRICS]), McpMetrics::default());
        for (i, url) in [
            "type.googleapis.com/google.protobuf.Struct",
            "type.googleapis.com/type.googleapis.com/google.protobuf.Struct",
            "type.googleapis.com/google.protobuf.Value",
        ]
        .into_iter()
        .enumerate()
        {
            let resource = mesh_api::pb::istio::mcp::v1alpha1::Resource {
                metadata: Some(Metadata {
                    name: "istio-system/requestcount".into(),
                    ..Metadata::default()
                }),
                body: Some(pbjson_types::Any {
                    type_url: url.into(),
                    value: Vec::new().into(),
                }),
            };
            let answer = sink.apply(Resources {
                collection: METRICS.into(),
                nonce: i.to_string(),
                resources: vec![resource],
                ..Resources::default()
            });
            let nacked = answer.error_detail.is_some();
            assert_eq!(nacked, url.ends_with("Value"), "{url}: {answer:?}");
        }
    }
}
