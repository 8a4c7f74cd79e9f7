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
mod sotw;

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use component::CancellationToken;
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{PUSH_ORDER, ResourceGenerator, TypeVersions};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The ADS service. Clones serve the same proxies' status, so one server
/// can listen on several ports (plaintext and mTLS).
pub struct AdsServer<G> {
    generator: Arc<G>,
    shutdown: CancellationToken,
    status: SyncStatus,
}

impl<G> Clone for AdsServer<G> {
    fn clone(&self) -> Self {
        Self {
            generator: self.generator.clone(),
            shutdown: self.shutdown.clone(),
            status: self.status.clone(),
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
    pub fn new(generator: Arc<G>, shutdown: CancellationToken) -> Self {
        Self {
            generator,
            shutdown,
            status: SyncStatus::default(),
        }
    }

    /// What every connected proxy was sent and answered.
    pub fn status(&self) -> SyncStatus {
        self.status.clone()
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }

    /// Runs one stream of either flavour until the proxy leaves, the
    /// stream fails or Pilot shuts down.
    fn serve<F: Flavor<G>>(&self, mut requests: Streaming<F::Request>) -> BoxStream<F::Response> {
        let (tx, rx) = mpsc::channel(16);
        let mut changes = self.generator.changes();
        let shutdown = self.shutdown.clone();
        let status = self.status.clone();
        let id = status.next_id.fetch_add(1, Ordering::Relaxed);
        let mut conn = Connection {
            generator: self.generator.clone(),
            node_id: String::new(),
            client: None,
            watches: BTreeMap::new(),
            responses: 0,
            seen: changes.borrow_and_update().clone(),
            connected_since: SystemTime::now(),
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
    type Request: Send + 'static;
    type Response: Send + 'static;

    fn on_request(
        conn: &mut Connection<G>,
        request: Self::Request,
    ) -> Result<Vec<Self::Response>, Status>;

    /// Responses for the watched `types` whose resources may have changed.
    fn on_change(conn: &mut Connection<G>, types: &[String]) -> Vec<Self::Response>;
}

/// One type on one stream.
#[derive(Default)]
struct Watch {
    /// Subscribed names; empty with `wildcard` for every resource.
    names: BTreeSet<String>,
    wildcard: bool,
    /// Nonce, version and content hash of the last response.
    sent: Option<Sent>,
    acked: Option<String>,
    last_nack: Option<String>,
    /// Delta: the version of each resource the proxy holds.
    held: BTreeMap<String, String>,
}

struct Sent {
    nonce: String,
    version: String,
    hash: u64,
}

impl Watch {
    /// The names to generate for: none means all.
    fn names(&self) -> Vec<String> {
        if self.wildcard {
            Vec::new()
        } else {
            self.names.iter().cloned().collect()
        }
    }

    /// Applies the answer to a response: `true` when it answers the latest
    /// one (an older nonce is stale and ignored).
    fn answer(&mut self, nonce: &str, error: Option<String>) -> bool {
        let Some(sent) = &self.sent else { return false };
        if sent.nonce != nonce {
            return false;
        }
        match error {
            None => self.acked = Some(sent.version.clone()),
            Some(reason) => self.last_nack = Some(reason),
        }
        true
    }
}

/// A stream's state, shared by both flavours.
struct Connection<G: ResourceGenerator> {
    generator: Arc<G>,
    node_id: String,
    client: Option<G::Client>,
    watches: BTreeMap<String, Watch>,
    /// Responses sent on the stream; each one's number is both its nonce
    /// and its version, unique on the stream and increasing.
    responses: u64,
    /// The generator's versions as of the last push.
    seen: TypeVersions,
    connected_since: SystemTime,
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
        self.client = Some(client);
        Ok(())
    }

    fn next_nonce(&mut self) -> String {
        self.responses += 1;
        self.responses.to_string()
    }

    /// The resources of a type for the watch's names, with their hashes.
    fn generate(&self, type_url: &str) -> Vec<(String, envoy_types::pb::google::protobuf::Any)> {
        let (Some(client), Some(watch)) = (&self.client, self.watches.get(type_url)) else {
            return Vec::new();
        };
        self.generator.generate(client, type_url, &watch.names())
    }

    fn record_nack(&self, type_url: &str, reason: &str) {
        tracing::warn!(%type_url, node = %self.node_id, %reason, "proxy NACKed");
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

/// A content hash of a set of resources.
fn content_hash<'a>(resources: impl Iterator<Item = (&'a String, &'a [u8])>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (name, bytes) in resources {
        name.hash(&mut hasher);
        bytes.hash(&mut hasher);
    }
    hasher.finish()
}

/// Forgets a stream's status when its task ends, however it ends.
struct RemoveOnDrop(SyncStatus, u64);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

#[tonic::async_trait]
impl<G: ResourceGenerator> AggregatedDiscoveryService for AdsServer<G> {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.serve::<sotw::Sotw>(request.into_inner()),
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.serve::<delta::Delta>(request.into_inner()),
        ))
    }
}
