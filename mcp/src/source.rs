//! The source side of one MCP stream, whichever side dialled: requests from
//! the sink come in, `Resources` go out (WIRE.md rules 1-7).
//!
//! Per collection the stream keeps the nonce it sent and what the sink is
//! known to hold (its initial versions, or the store sequence it last
//! ACKed). It sends nothing for a collection while an answer is pending, and
//! after an answer only when the collection has changed since, so a slow
//! sink gets the latest state once rather than every step (latest wins).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use component::CancellationToken;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::{McpMetrics, store::Store};
use mesh_api::pb::istio::mcp::v1alpha1::{RequestResources, Resource, Resources};

/// Which collections a source serves incrementally when a sink asks.
#[derive(Debug, Clone, Default)]
pub enum IncrementalPolicy {
    #[default]
    All,
    None,
    Only(HashSet<String>),
}

impl IncrementalPolicy {
    fn allows(&self, collection: &str) -> bool {
        match self {
            Self::All => true,
            Self::None => false,
            Self::Only(set) => set.contains(collection),
        }
    }
}

/// What the sink holds of a collection, as far as this stream knows.
enum Holds {
    /// Nothing known: the watch asked for the whole state, so declared
    /// nothing, and has ACKed nothing since. A diff needs a base, so the
    /// next response is whole even if the sink then asks for increments.
    Unknown,
    /// What it declared in `initial_resource_versions` with an
    /// incremental watch.
    Versions(BTreeMap<String, String>),
    /// The store state at this sequence, which it ACKed.
    Seq(u64),
}

struct Watch {
    incremental: bool,
    holds: Holds,
    /// The response awaiting an answer.
    pending: Option<Pending>,
    /// Store sequence of the last answered response; `None` before the first.
    answered: Option<u64>,
}

/// A response sent and not yet answered.
struct Pending {
    nonce: String,
    /// The store sequence it brings the sink to.
    seq: u64,
    /// Its span, from sending to answer, when the change it carries was
    /// traced.
    span: opentelemetry::Context,
}

/// Serves one stream until the sink goes away, breaks the protocol or
/// `shutdown` fires. Protocol errors are sent to `responses` as the
/// stream's final status.
pub async fn serve_stream<S>(
    store: Arc<Store>,
    policy: IncrementalPolicy,
    metrics: McpMetrics,
    mut requests: S,
    responses: mpsc::Sender<Result<Resources, Status>>,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<RequestResources, Status>> + Unpin,
{
    let mut changes = store.subscribe();
    let mut stream = SourceStream {
        store,
        policy,
        metrics,
        watches: HashMap::new(),
        nonces: 0,
    };
    loop {
        tokio::select! {
            request = requests.next() => match request {
                Some(Ok(request)) => {
                    if let Err(status) = stream.on_request(request) {
                        tracing::warn!(%status, "ending MCP stream");
                        let _ = responses.send(Err(status)).await;
                        break;
                    }
                }
                Some(Err(status)) => {
                    // Say why to the sink: a message that does not decode
                    // is its error, not a silent end of stream.
                    tracing::debug!(%status, "MCP sink stream failed");
                    let _ = responses.send(Err(status)).await;
                    break;
                }
                None => break,
            },
            changed = changes.changed() => if changed.is_err() { break },
            _ = shutdown.cancelled() => {
                let _ = responses.send(Err(Status::unavailable("MCP source is shutting down"))).await;
                break;
            }
        }
        for response in stream.due_responses() {
            if responses.send(Ok(response)).await.is_err() {
                break;
            }
        }
    }
    for collection in stream.watches.keys() {
        stream.metrics.stream_closed(collection);
    }
}

struct SourceStream {
    store: Arc<Store>,
    policy: IncrementalPolicy,
    metrics: McpMetrics,
    watches: HashMap<String, Watch>,
    nonces: u64,
}

impl SourceStream {
    fn on_request(&mut self, req: RequestResources) -> Result<(), Status> {
        let collection = req.collection.clone();
        if !self.store.serves(&collection) {
            return Err(Status::invalid_argument(format!(
                "collection {collection:?} is not served by this source"
            )));
        }
        if req.response_nonce.is_empty() {
            // A new watch, or the sink starting over on this stream.
            let fresh = Watch {
                incremental: req.incremental,
                holds: if req.incremental {
                    Holds::Versions(req.initial_resource_versions)
                } else {
                    Holds::Unknown
                },
                pending: None,
                answered: None,
            };
            if self.watches.insert(collection.clone(), fresh).is_none() {
                self.metrics.stream_opened(&collection);
            }
            return Ok(());
        }
        let Some(watch) = self.watches.get_mut(&collection) else {
            self.metrics.stale_nonce(&collection);
            return Ok(());
        };
        let Some(Pending { nonce, seq, span }) =
            watch.pending.take_if(|p| p.nonce == req.response_nonce)
        else {
            tracing::debug!(%collection, nonce = %req.response_nonce, "ignoring stale nonce");
            self.metrics.stale_nonce(&collection);
            return Ok(());
        };
        watch.incremental = req.incremental;
        watch.answered = Some(seq);
        let sink = req.sink_node.map(|n| n.id).unwrap_or_default();
        let error = match req.error_detail {
            None => {
                watch.holds = Holds::Seq(seq);
                self.metrics.ack(&collection);
                None
            }
            Some(error) => {
                // The sink kept its last good state, which is what `holds`
                // still describes; nothing more is sent until a change.
                tracing::warn!(%collection, %nonce, code = error.code, message = %error.message,
                    %sink, "MCP sink NACKed");
                self.metrics.nack(&collection);
                Some(format!("NACK: {}", error.message))
            }
        };
        use opentelemetry::trace::TraceContextExt;
        span.span()
            .set_attribute(opentelemetry::KeyValue::new("mcp.sink", sink));
        component::trace::end(&span, error);
        Ok(())
    }

    /// The responses to send now: one per collection that has no answer
    /// pending and has changed since its last answered response.
    fn due_responses(&mut self) -> Vec<Resources> {
        let mut out = Vec::new();
        for (collection, watch) in &mut self.watches {
            let Some(seq) = self.store.seq(collection) else {
                continue;
            };
            if watch.pending.is_some() || watch.answered.is_some_and(|a| a >= seq) {
                continue;
            }
            let incremental = watch.incremental && self.policy.allows(collection);
            let diff = match (&watch.holds, incremental) {
                (Holds::Versions(v), true) => self.store.diff_against(collection, v),
                (Holds::Seq(base), true) => self.store.diff_since(collection, *base),
                (Holds::Unknown, _) | (_, false) => None,
            };
            let (sent_seq, mut response) = match diff {
                Some(d) => (
                    d.seq,
                    Resources {
                        resources: d.changed.iter().map(|r| Resource::clone(r)).collect(),
                        removed_resources: d.removed,
                        incremental: true,
                        system_version_info: d.seq.to_string(),
                        ..Resources::default()
                    },
                ),
                None => {
                    let Some((seq, all)) = self.store.full(collection) else {
                        continue;
                    };
                    (
                        seq,
                        Resources {
                            resources: all.iter().map(|r| Resource::clone(r)).collect(),
                            system_version_info: seq.to_string(),
                            ..Resources::default()
                        },
                    )
                }
            };
            self.nonces += 1;
            response.collection = collection.clone();
            // A change made in a span (a Galley reload) is pushed in a
            // span of its trace, which the nonce carries to the sink.
            let span = match self.store.trace(collection) {
                Some(change) => component::trace::span(
                    "mcp",
                    format!("mcp push {collection}"),
                    Some(&change),
                    None,
                    vec![
                        opentelemetry::KeyValue::new("mcp.collection", collection.clone()),
                        opentelemetry::KeyValue::new("mcp.incremental", response.incremental),
                        opentelemetry::KeyValue::new(
                            "mcp.resources",
                            response.resources.len() as i64,
                        ),
                    ],
                ),
                None => opentelemetry::Context::new(),
            };
            let traced = component::trace::context_of(&span);
            response.nonce = component::trace::nonce(self.nonces, traced.as_ref());
            watch.pending = Some(Pending {
                nonce: response.nonce.clone(),
                seq: sent_seq,
                span,
            });
            self.metrics.response(collection, response.encoded_len());
            self.metrics
                .resources_held(collection, self.store.len(collection));
            out.push(response);
        }
        out
    }
}
