//! Aggregated discovery, state of the world: one stream per proxy carrying
//! every type. Per type the stream keeps the names subscribed, the version
//! and nonce last sent, the version ACKed and the last NACK. A response goes
//! out when the proxy subscribes or changes its names, and when what it
//! would receive changes; a NACK is recorded and nothing is resent until the
//! config changes, so the proxy keeps its last good config.

use std::{
    collections::{BTreeMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{Arc, Mutex},
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

use super::{PUSH_ORDER, ResourceGenerator};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The ADS service.
pub struct AdsServer<G> {
    generator: Arc<G>,
    shutdown: CancellationToken,
    status: SyncStatus,
}

/// Per connected proxy, what was sent, ACKed and NACKed, by stream.
#[derive(Clone, Default)]
pub struct SyncStatus {
    streams: Arc<Mutex<BTreeMap<u64, ProxyStatus>>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

/// One proxy's stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStatus {
    pub node_id: String,
    pub connected_since: Option<std::time::SystemTime>,
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
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn update(&self, id: u64, status: ProxyStatus) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, status);
    }

    fn remove(&self, id: u64) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
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
}

/// One type on one stream.
#[derive(Default)]
struct Watch {
    names: Vec<String>,
    /// Nonce, version and content hash of the last response.
    sent: Option<(String, String, u64)>,
    acked: Option<String>,
    last_nack: Option<String>,
}

struct AdsStream<G> {
    generator: Arc<G>,
    node: Option<Node>,
    watches: BTreeMap<String, Watch>,
    /// Responses sent on the stream; each one's number is both its nonce
    /// and its version, unique on the stream and increasing.
    responses: u64,
}

impl<G: ResourceGenerator> AdsStream<G> {
    fn status(&self, connected_since: std::time::SystemTime) -> ProxyStatus {
        ProxyStatus {
            node_id: self.node.as_ref().map(|n| n.id.clone()).unwrap_or_default(),
            connected_since: Some(connected_since),
            types: self
                .watches
                .iter()
                .map(|(t, w)| {
                    let status = TypeStatus {
                        sent_version: w.sent.as_ref().map(|(_, v, _)| v.clone()),
                        sent_nonce: w.sent.as_ref().map(|(n, _, _)| n.clone()),
                        acked_version: w.acked.clone(),
                        last_nack: w.last_nack.clone(),
                    };
                    (t.clone(), status)
                })
                .collect(),
        }
    }

    /// Applies a request; returns whether its type must be (re)generated.
    fn on_request(&mut self, request: DiscoveryRequest) -> Result<bool, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("an ADS request needs a type_url"));
        }
        if self.node.is_none() {
            self.node = request.node.clone();
        }
        let watch = self.watches.entry(request.type_url.clone()).or_default();
        let names_changed = watch.names != request.resource_names;
        watch.names = request.resource_names;
        if request.response_nonce.is_empty() {
            return Ok(true);
        }
        let Some((nonce, version, _)) = &watch.sent else {
            return Ok(names_changed);
        };
        if *nonce != request.response_nonce {
            // Stale: answers a response that has been superseded.
            return Ok(false);
        }
        match request.error_detail {
            None => watch.acked = Some(version.clone()),
            Some(error) => {
                tracing::warn!(type_url = %request.type_url, node = ?self.node.as_ref().map(|n| &n.id), reason = %error.message, "proxy NACKed");
                watch.last_nack = Some(error.message);
            }
        }
        Ok(names_changed)
    }

    /// The response for `type_url`, unless it would repeat what was sent.
    fn generate(&mut self, type_url: &str, force: bool) -> Option<DiscoveryResponse> {
        let node = self.node.clone().unwrap_or_default();
        let watch = self.watches.get_mut(type_url)?;
        let resources = self.generator.generate(&node, type_url, &watch.names);
        let mut hasher = DefaultHasher::new();
        for (name, any) in &resources {
            name.hash(&mut hasher);
            any.value.hash(&mut hasher);
        }
        let hash = hasher.finish();
        if !force && watch.sent.as_ref().is_some_and(|(_, _, h)| *h == hash) {
            return None;
        }
        self.responses += 1;
        let (nonce, version) = (self.responses.to_string(), self.responses.to_string());
        watch.sent = Some((nonce.clone(), version.clone(), hash));
        Some(DiscoveryResponse {
            version_info: version,
            resources: resources.into_iter().map(|(_, any)| any).collect(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }

    /// Responses for every watched type whose resources changed, in push order.
    fn on_change(&mut self) -> Vec<DiscoveryResponse> {
        let types: Vec<String> = PUSH_ORDER
            .iter()
            .map(|t| t.to_string())
            .chain(
                self.watches
                    .keys()
                    .filter(|t| !PUSH_ORDER.contains(&t.as_str()))
                    .cloned(),
            )
            .filter(|t| self.watches.contains_key(t))
            .collect();
        types
            .iter()
            .filter_map(|t| self.generate(t, false))
            .collect()
    }
}

/// Forgets a stream's status when its task ends, however it ends.
struct RemoveOnDrop(SyncStatus, u64);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.remove(self.1);
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
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let mut changes = self.generator.changes();
        let shutdown = self.shutdown.clone();
        let mut stream = AdsStream {
            generator: self.generator.clone(),
            node: None,
            watches: BTreeMap::new(),
            responses: 0,
        };
        let status = self.status.clone();
        let id = status
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let connected_since = std::time::SystemTime::now();
        tokio::spawn(async move {
            let _gone = RemoveOnDrop(status.clone(), id);
            loop {
                let responses = tokio::select! {
                    request = requests.next() => match request {
                        Some(Ok(request)) => {
                            let type_url = request.type_url.clone();
                            match stream.on_request(request) {
                                Ok(true) => stream.generate(&type_url, true).into_iter().collect(),
                                Ok(false) => Vec::new(),
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    return;
                                }
                            }
                        }
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
                        stream.on_change()
                    }
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("pilot is shutting down"))).await;
                        return;
                    }
                };
                // Recorded before sending, so that what a proxy has received
                // is always in the status.
                status.update(id, stream.status(connected_since));
                for response in responses {
                    if tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "delta ADS is not served yet; use StreamAggregatedResources",
        ))
    }
}
