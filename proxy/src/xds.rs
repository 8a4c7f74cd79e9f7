//! The ADS client: one state-of-the-world stream to Pilot carrying
//! clusters and listeners (wildcard) and the endpoints and routes they name.
//! Each response is compiled before it is taken: a resource that does not
//! compile NACKs the response with the reason and the last good config
//! keeps serving; one that does is swapped in whole and ACKed. Clusters
//! come before their endpoints and listeners before their routes, as Pilot
//! pushes them. When Pilot is away the proxy keeps what it has and
//! reconnects with backoff, telling Pilot the versions it holds.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use component::{Backoff, CancellationToken};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener, route::v3::RouteConfiguration,
        },
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{protobuf::Any, rpc::Status},
};
use mcp_proto::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::{Problem, Snapshot};

/// What the proxy holds of one type, for ACKs, reconnects and `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// Version last ACKed.
    pub version: String,
    #[serde(skip)]
    nonce: String,
    /// Names subscribed (empty: all, for clusters and listeners).
    pub names: Vec<String>,
    /// Why the last response was refused, if it was.
    pub last_nack: Option<String>,
    /// Whether a response of this type was applied since the proxy started.
    pub received: bool,
}

/// The raw resources held, by type and name.
#[derive(Default)]
struct Held {
    clusters: BTreeMap<String, Cluster>,
    endpoints: BTreeMap<String, ClusterLoadAssignment>,
    listeners: BTreeMap<String, Listener>,
    routes: BTreeMap<String, RouteConfiguration>,
}

/// The xDS state shared with the admin pages.
#[derive(Default)]
pub struct XdsState {
    pub status: Mutex<BTreeMap<&'static str, TypeStatus>>,
    /// The resources as received, for `/config_dump`.
    pub raw: Mutex<BTreeMap<&'static str, Vec<serde_json::Value>>>,
}

pub struct XdsClient {
    node: Node,
    pilot: String,
    held: Held,
    state: Arc<XdsState>,
    config: watch::Sender<Arc<Snapshot>>,
}

const TYPES: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

impl XdsClient {
    pub fn new(
        node: Node,
        pilot: String,
        state: Arc<XdsState>,
        config: watch::Sender<Arc<Snapshot>>,
    ) -> Self {
        Self {
            node,
            pilot,
            held: Held::default(),
            state,
            config,
        }
    }

    /// Streams until `shutdown`, reconnecting with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = self.stream(&mut backoff) => result,
            };
            if let Err(e) = attempt {
                tracing::warn!(pilot = %self.pilot, "xDS stream ended: {e}; the last config keeps serving");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = backoff.wait() => {}
            }
        }
    }

    fn status(&self, type_url: &'static str) -> TypeStatus {
        let status = self.state.status.lock().unwrap_or_else(|e| e.into_inner());
        status.get(type_url).cloned().unwrap_or_default()
    }

    fn set_status(&self, type_url: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        let mut status = self.state.status.lock().unwrap_or_else(|e| e.into_inner());
        f(status.entry(type_url).or_default());
    }

    fn request(&self, type_url: &'static str, error: Option<Problem>) -> DiscoveryRequest {
        let status = self.status(type_url);
        DiscoveryRequest {
            version_info: status.version,
            node: Some(self.node.clone()),
            resource_names: status.names,
            type_url: type_url.to_string(),
            response_nonce: status.nonce,
            error_detail: error.map(|Problem(message)| Status {
                // INVALID_ARGUMENT, as Envoy reports a rejected config.
                code: 3,
                message,
                details: Vec::new(),
            }),
            ..Default::default()
        }
    }

    async fn stream(&mut self, backoff: &mut Backoff) -> anyhow::Result<()> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.pilot))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        // A new stream starts with no nonce; the versions say what is held.
        for type_url in TYPES {
            self.set_status(type_url, |s| s.nonce.clear());
        }
        for type_url in [CLUSTER, LISTENER] {
            tx.send(self.request(type_url, None))?;
        }
        for type_url in [ENDPOINT, ROUTE] {
            if !self.status(type_url).names.is_empty() {
                tx.send(self.request(type_url, None))?;
            }
        }
        let mut responses = client
            .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        tracing::info!(pilot = %self.pilot, "xDS stream open");
        while let Some(response) = responses.message().await? {
            backoff.reset();
            self.apply(response, &tx)?;
        }
        anyhow::bail!("Pilot closed the stream")
    }

    /// Takes or refuses one response, and asks for what it newly names.
    fn apply(
        &mut self,
        response: DiscoveryResponse,
        tx: &mpsc::UnboundedSender<DiscoveryRequest>,
    ) -> anyhow::Result<()> {
        let Some(type_url) = TYPES.into_iter().find(|t| *t == response.type_url) else {
            tracing::debug!(type_url = %response.type_url, "ignoring a type not asked for");
            return Ok(());
        };
        self.set_status(type_url, |s| s.nonce = response.nonce.clone());
        match self.take(type_url, &response.resources) {
            Ok(()) => {
                self.set_status(type_url, |s| {
                    s.version = response.version_info.clone();
                    s.last_nack = None;
                    s.received = true;
                });
                tx.send(self.request(type_url, None))?;
                tracing::debug!(type_url, version = %response.version_info, "ACK");
                self.follow_names(tx)?;
            }
            Err(problem) => {
                tracing::warn!(type_url, version = %response.version_info, "NACK: {problem}");
                self.set_status(type_url, |s| s.last_nack = Some(problem.0.clone()));
                tx.send(self.request(type_url, Some(problem)))?;
            }
        }
        Ok(())
    }

    /// Whether `next`, taken from a response of `type_url`, has every type
    /// and every name asked for.
    fn synced_with(&self, type_url: &str, next: &Snapshot) -> bool {
        let status = self.state.status.lock().unwrap_or_else(|e| e.into_inner());
        let received = |t: &str| t == type_url || status.get(t).is_some_and(|s| s.received);
        received(CLUSTER)
            && received(LISTENER)
            && next
                .eds_names()
                .iter()
                .all(|n| next.endpoints.contains_key(n))
            && next.rds_names().iter().all(|n| next.routes.contains_key(n))
    }

    /// Subscribes to the endpoints and routes the new config names.
    fn follow_names(&mut self, tx: &mpsc::UnboundedSender<DiscoveryRequest>) -> anyhow::Result<()> {
        let (eds, rds) = {
            let snapshot = self.config.borrow();
            (snapshot.eds_names(), snapshot.rds_names())
        };
        for (type_url, names) in [(ENDPOINT, eds), (ROUTE, rds)] {
            if self.status(type_url).names != names {
                self.set_status(type_url, |s| s.names = names);
                tx.send(self.request(type_url, None))?;
            }
        }
        Ok(())
    }

    /// Compiles the held resources with `resources` in place, and swaps the
    /// result in; on a problem nothing changes.
    fn take(&mut self, type_url: &'static str, resources: &[Any]) -> Result<(), Problem> {
        let current = self.config.borrow().clone();
        let names = self.status(type_url).names;
        let mut snapshot = match type_url {
            CLUSTER => {
                let held = decode_all::<Cluster>(resources, |c| c.name.clone())?;
                let clusters = Snapshot::clusters(&held.values().cloned().collect::<Vec<_>>())?;
                let next = Snapshot {
                    clusters,
                    listeners: current.listeners.clone(),
                    routes: current.routes.clone(),
                    endpoints: current.endpoints.clone(),
                    synced: false,
                };
                self.held.clusters = held;
                next
            }
            LISTENER => {
                let held = decode_all::<Listener>(resources, |l| l.name.clone())?;
                let listeners = Snapshot::listeners(&held.values().cloned().collect::<Vec<_>>())?;
                let next = Snapshot {
                    listeners,
                    clusters: current.clusters.clone(),
                    routes: current.routes.clone(),
                    endpoints: current.endpoints.clone(),
                    synced: false,
                };
                self.held.listeners = held;
                next
            }
            ENDPOINT => {
                let update =
                    decode_all::<ClusterLoadAssignment>(resources, |a| a.cluster_name.clone())?;
                // Named types may carry only what changed.
                let held = merged(&self.held.endpoints, update, &names);
                let endpoints = Snapshot::endpoints(&held.values().cloned().collect::<Vec<_>>())?;
                let next = Snapshot {
                    endpoints,
                    clusters: current.clusters.clone(),
                    listeners: current.listeners.clone(),
                    routes: current.routes.clone(),
                    synced: false,
                };
                self.held.endpoints = held;
                next
            }
            _ => {
                let update = decode_all::<RouteConfiguration>(resources, |r| r.name.clone())?;
                let held = merged(&self.held.routes, update, &names);
                let routes = Snapshot::routes(&held.values().cloned().collect::<Vec<_>>())?;
                let next = Snapshot {
                    routes,
                    clusters: current.clusters.clone(),
                    listeners: current.listeners.clone(),
                    endpoints: current.endpoints.clone(),
                    synced: false,
                };
                self.held.routes = held;
                next
            }
        };
        // Once whole, a config stays whole: later responses only replace.
        snapshot.synced = current.synced || self.synced_with(type_url, &snapshot);
        self.record_raw(type_url);
        self.config.send_replace(Arc::new(snapshot));
        Ok(())
    }

    fn record_raw(&self, type_url: &'static str) {
        fn json<T: std::fmt::Debug>(items: &BTreeMap<String, T>) -> Vec<serde_json::Value> {
            items
                .iter()
                .map(|(name, r)| serde_json::json!({"name": name, "resource": format!("{r:?}")}))
                .collect()
        }
        let dump = match type_url {
            CLUSTER => json(&self.held.clusters),
            LISTENER => json(&self.held.listeners),
            ENDPOINT => json(&self.held.endpoints),
            _ => json(&self.held.routes),
        };
        let mut raw = self.state.raw.lock().unwrap_or_else(|e| e.into_inner());
        raw.insert(type_url, dump);
    }
}

fn decode_all<T: Message + Default>(
    resources: &[Any],
    name: impl Fn(&T) -> String,
) -> Result<BTreeMap<String, T>, Problem> {
    resources
        .iter()
        .map(|any| {
            let r = T::decode(any.value.as_slice()).map_err(|e| {
                Problem(format!(
                    "a resource of {:?} does not decode: {e}",
                    any.type_url
                ))
            })?;
            Ok((name(&r), r))
        })
        .collect()
}

/// `held` with `update` laid over it, keeping only `names` (all when empty).
fn merged<T: Clone>(
    held: &BTreeMap<String, T>,
    update: BTreeMap<String, T>,
    names: &[String],
) -> BTreeMap<String, T> {
    let mut out: BTreeMap<String, T> = held.clone();
    out.extend(update);
    if !names.is_empty() {
        out.retain(|name, _| names.binary_search(name).is_ok());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::{
        core::v3::{Address, SocketAddress, address, socket_address},
        listener::v3::{Filter, FilterChain, filter},
    };

    fn listener(name: &str, filter_type: &str, config: Vec<u8>) -> Any {
        let l = Listener {
            name: name.into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(15001)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "tcp".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: filter_type.into(),
                        value: config,
                    })),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        Any {
            type_url: LISTENER.into(),
            value: l.encode_to_vec(),
        }
    }

    #[test]
    fn a_listener_that_does_not_compile_is_refused_and_the_last_good_stays() {
        let (tx, config) = watch::channel(Arc::new(Snapshot::default()));
        let mut client = XdsClient::new(Node::default(), "pilot".into(), Arc::default(), tx);
        use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
            TcpProxy, tcp_proxy::ClusterSpecifier,
        };
        let tcp = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
        let to_cluster = TcpProxy {
            stat_prefix: "good".into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster("c".into())),
            ..Default::default()
        };
        client
            .take(
                LISTENER,
                &[listener("good", tcp, to_cluster.encode_to_vec())],
            )
            .unwrap();
        let held = || {
            config
                .borrow()
                .listeners
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(held(), ["good"]);

        // A TCP proxy without a cluster is refused, naming what is wrong.
        let problem = client
            .take(LISTENER, &[listener("a", tcp, Vec::new())])
            .unwrap_err();
        assert!(problem.0.contains("listener \"a\""), "{problem}");
        assert!(problem.0.contains("without a cluster"), "{problem}");
        assert_eq!(held(), ["good"]);

        // So is a filter nothing here runs; nothing is half-applied.
        let unknown = "type.googleapis.com/example.Unknown";
        let problem = client
            .take(
                LISTENER,
                &[
                    listener("good", tcp, to_cluster.encode_to_vec()),
                    listener("b", unknown, Vec::new()),
                ],
            )
            .unwrap_err();
        assert!(problem.0.contains("example.Unknown"), "{problem}");
        assert_eq!(held(), ["good"]);
    }
}
