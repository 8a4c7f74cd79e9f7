//! The ADS client: one stream to Pilot carrying clusters and listeners
//! (wildcard) and the endpoints and routes they name, incremental (delta)
//! when Pilot offers it and state of the world otherwise. Each response is
//! compiled before it is taken: a resource that does not compile NACKs the
//! response with the reason and the last good config keeps serving; one
//! that does is swapped in whole and ACKed. Clusters come before their
//! endpoints and listeners before their routes, as Pilot pushes them. When
//! Pilot is away the proxy keeps what it has and reconnects with backoff,
//! telling Pilot what it holds. The two flavours sit side by side
//! (`sotw`, `delta`) over what both share: the resources held and what
//! they compiled to (`held`), and how a response is taken or refused.

mod delta;
mod held;
mod sotw;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use clap::ValueEnum;
use component::{Backoff, CancellationToken};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener, route::v3::RouteConfiguration,
        },
        service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    google::{protobuf::Any, rpc::Status},
};
use mesh_api::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{self, Problem, Snapshot};

use held::{HeldMap, compile_changed, compiled, next_held};

/// Which ADS flavour to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdsMode {
    /// Delta, or state of the world if Pilot does not offer delta.
    Auto,
    Sotw,
    Delta,
}

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

/// The resources held, by type and name, and their delta versions.
#[derive(Default)]
struct Held {
    clusters: HeldMap<Cluster, config::Cluster>,
    endpoints: HeldMap<ClusterLoadAssignment, config::Endpoints>,
    listeners: HeldMap<Listener, config::Listener>,
    routes: HeldMap<RouteConfiguration, config::RouteTable>,
    versions: BTreeMap<&'static str, BTreeMap<String, String>>,
}

/// The xDS state shared with the admin pages.
#[derive(Default)]
pub struct XdsState {
    pub status: Mutex<BTreeMap<&'static str, TypeStatus>>,
    /// The flavour the stream speaks.
    pub mode: Mutex<Option<&'static str>>,
}

/// What a response says of one type's resources.
enum Update {
    /// State of the world: all of them (for named types, those changed).
    Sotw(Vec<Any>),
    /// These added or changed (with their versions), these removed.
    Delta {
        added: Vec<(String, String, Any)>,
        removed: Vec<String>,
    },
}

/// What the client tells Pilot next, in either flavour.
enum Say {
    Ack(&'static str),
    Nack(&'static str, Problem),
    Subscribe {
        type_url: &'static str,
        added: Vec<String>,
        removed: Vec<String>,
    },
}

pub struct XdsClient {
    node: Node,
    pilot: String,
    mode: XdsMode,
    held: Held,
    state: Arc<XdsState>,
    config: watch::Sender<Arc<Snapshot>>,
    /// Spans of updates Pilot traced (their nonce carries the trace).
    tracing: Arc<crate::trace::Tracing>,
}

const TYPES: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

impl XdsClient {
    pub fn new(
        node: Node,
        pilot: String,
        mode: XdsMode,
        state: Arc<XdsState>,
        config: watch::Sender<Arc<Snapshot>>,
    ) -> Self {
        Self {
            node,
            pilot,
            mode,
            held: Held::default(),
            state,
            config,
            tracing: Arc::default(),
        }
    }

    /// Makes a span of each update whose nonce carries a trace.
    pub fn traced(mut self, tracing: Arc<crate::trace::Tracing>) -> Self {
        self.tracing = tracing;
        self
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
                let unimplemented = e
                    .downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unimplemented);
                if unimplemented && self.mode == XdsMode::Auto {
                    tracing::info!(pilot = %self.pilot, "Pilot offers no delta xDS; state of the world from now on");
                    self.mode = XdsMode::Sotw;
                    continue;
                }
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

    async fn stream(&mut self, backoff: &mut Backoff) -> anyhow::Result<()> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.pilot))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        let client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        // A new stream starts with no nonce; what is held says the rest.
        for type_url in TYPES {
            self.set_status(type_url, |s| s.nonce.clear());
        }
        let flavour = if self.mode == XdsMode::Sotw {
            "sotw"
        } else {
            "delta"
        };
        *self.state.mode.lock().unwrap_or_else(|e| e.into_inner()) = Some(flavour);
        if self.mode == XdsMode::Sotw {
            self.stream_sotw(client, backoff).await
        } else {
            self.stream_delta(client, backoff).await
        }
    }

    /// Takes or refuses one response, and says what to tell Pilot: the
    /// ACK or NACK, and the subscriptions the new config changes.
    fn apply(
        &mut self,
        type_url: &str,
        nonce: String,
        version: String,
        update: Update,
    ) -> Vec<Say> {
        let Some(type_url) = TYPES.into_iter().find(|t| *t == type_url) else {
            tracing::debug!(type_url, "ignoring a type not asked for");
            return Vec::new();
        };
        let span = component::trace::of_nonce(&nonce).and_then(|pilot| {
            let kind = type_url.rsplit('.').next().unwrap_or(type_url);
            self.tracing
                .child(format!("proxy xds apply {kind}"), &pilot)
        });
        self.set_status(type_url, |s| s.nonce = nonce);
        let taken = self.take(type_url, update);
        if let Some(span) = span {
            span.end(&version, taken.as_ref().err().map(|p| p.0.clone()));
        }
        match taken {
            Ok(()) => {
                self.set_status(type_url, |s| {
                    s.version = version.clone();
                    s.last_nack = None;
                    s.received = true;
                });
                tracing::debug!(type_url, %version, "ACK");
                let mut says = vec![Say::Ack(type_url)];
                says.extend(self.follow_names());
                says
            }
            Err(problem) => {
                tracing::warn!(type_url, %version, "NACK: {problem}");
                self.set_status(type_url, |s| s.last_nack = Some(problem.0.clone()));
                vec![Say::Nack(type_url, problem)]
            }
        }
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

    /// Subscriptions to the endpoints and routes the new config names.
    fn follow_names(&mut self) -> Vec<Say> {
        let (eds, rds) = {
            let snapshot = self.config.borrow();
            (snapshot.eds_names(), snapshot.rds_names())
        };
        let mut says = Vec::new();
        for (type_url, names) in [(ENDPOINT, eds), (ROUTE, rds)] {
            let old = self.status(type_url).names;
            if old != names {
                let added = names.iter().filter(|n| !old.contains(n)).cloned().collect();
                let removed = old.iter().filter(|n| !names.contains(n)).cloned().collect();
                self.set_status(type_url, |s| s.names = names);
                says.push(Say::Subscribe {
                    type_url,
                    added,
                    removed,
                });
            }
        }
        says
    }

    /// Compiles the held resources with `update` applied, and swaps the
    /// result in; on a problem nothing changes.
    fn take(&mut self, type_url: &'static str, update: Update) -> Result<(), Problem> {
        let current = self.config.borrow().clone();
        let names = self.status(type_url).names;
        let mut next = (*current).clone();
        let versions = match &update {
            Update::Delta { added, removed } => {
                let mut v = self
                    .held
                    .versions
                    .get(type_url)
                    .cloned()
                    .unwrap_or_default();
                for name in removed {
                    v.remove(name);
                }
                v.extend(
                    added
                        .iter()
                        .map(|(n, version, _)| (n.clone(), version.clone())),
                );
                v
            }
            Update::Sotw(_) => BTreeMap::new(),
        };
        // Only what changed is compiled again; the rest keeps what it
        // compiled to (an endpoint change recompiles no route regex).
        match type_url {
            CLUSTER => {
                let raw = next_held(
                    &self.held.clusters,
                    update,
                    |c: &Cluster| c.name.clone(),
                    None,
                )?;
                let held = compile_changed(&self.held.clusters, raw, config::Cluster::compile)?;
                next.clusters = compiled(&held);
                self.held.clusters = held;
            }
            LISTENER => {
                let name = |l: &Listener| l.name.clone();
                let raw = next_held(&self.held.listeners, update, name, None)?;
                let held = compile_changed(&self.held.listeners, raw, config::Listener::compile)?;
                next.listeners = compiled(&held);
                self.held.listeners = held;
            }
            ENDPOINT => {
                let name = |a: &ClusterLoadAssignment| a.cluster_name.clone();
                let raw = next_held(&self.held.endpoints, update, name, Some(&names))?;
                let held =
                    compile_changed(&self.held.endpoints, raw, config::cluster::eds_endpoints)?;
                next.endpoints = compiled(&held);
                self.held.endpoints = held;
            }
            _ => {
                let name = |r: &RouteConfiguration| r.name.clone();
                let raw = next_held(&self.held.routes, update, name, Some(&names))?;
                let held = compile_changed(&self.held.routes, raw, config::RouteTable::compile)?;
                next.routes = compiled(&held);
                self.held.routes = held;
            }
        }
        self.held.versions.insert(type_url, versions);
        // Once whole, a config stays whole: later responses only replace.
        next.synced = current.synced || self.synced_with(type_url, &next);
        self.config.send_replace(Arc::new(next));
        Ok(())
    }
}

/// A NACK's error detail: INVALID_ARGUMENT, as Envoy reports a rejected
/// config.
fn rejection(Problem(message): Problem) -> Status {
    Status {
        code: 3,
        message,
        details: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::{
        config::{
            core::v3::{Address, SocketAddress, address, socket_address},
            listener::v3::{Filter, FilterChain, filter},
        },
        extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy::ClusterSpecifier},
    };
    use prost::Message;

    const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

    /// A client of no Pilot, and the config it makes.
    fn client() -> (XdsClient, watch::Receiver<Arc<Snapshot>>) {
        let (tx, config) = watch::channel(Arc::new(Snapshot::default()));
        let client = XdsClient::new(
            Node::default(),
            "pilot".into(),
            XdsMode::Auto,
            Arc::default(),
            tx,
        );
        (client, config)
    }

    /// A TCP proxy's config, to `cluster`.
    fn to(cluster: &str) -> Vec<u8> {
        TcpProxy {
            stat_prefix: "tcp".into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }
        .encode_to_vec()
    }

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
        let (mut client, config) = client();
        let tcp = TCP;
        client
            .take(LISTENER, Update::Sotw(vec![listener("good", tcp, to("c"))]))
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
            .take(LISTENER, Update::Sotw(vec![listener("a", tcp, Vec::new())]))
            .unwrap_err();
        assert!(problem.0.contains("listener \"a\""), "{problem}");
        assert!(problem.0.contains("without a cluster"), "{problem}");
        assert_eq!(held(), ["good"]);

        // So is a filter nothing here runs; nothing is half-applied.
        let unknown = "type.googleapis.com/example.Unknown";
        let problem = client
            .take(
                LISTENER,
                Update::Sotw(vec![
                    listener("good", tcp, to("c")),
                    listener("b", unknown, Vec::new()),
                ]),
            )
            .unwrap_err();
        assert!(problem.0.contains("example.Unknown"), "{problem}");
        assert_eq!(held(), ["good"]);

        // A delta adds and removes by name.
        let added = listener("c", tcp, to("c"));
        client
            .take(
                LISTENER,
                Update::Delta {
                    added: vec![("c".into(), "v1".into(), added)],
                    removed: vec!["good".into()],
                },
            )
            .unwrap();
        assert_eq!(held(), ["c"]);
        assert_eq!(client.held.versions[LISTENER]["c"], "v1");
    }

    #[test]
    fn a_response_compiles_only_the_resources_that_changed() {
        let (mut client, config) = client();
        let tcp = TCP;
        let both =
            |b: &str| Update::Sotw(vec![listener("a", tcp, to("x")), listener("b", tcp, to(b))]);
        client.take(LISTENER, both("x")).unwrap();
        let before = config.borrow().clone();
        // State of the world: both again, only `b` changed.
        client.take(LISTENER, both("y")).unwrap();
        let after = config.borrow().clone();
        assert!(Arc::ptr_eq(&before.listeners["a"], &after.listeners["a"]));
        assert!(!Arc::ptr_eq(&before.listeners["b"], &after.listeners["b"]));
        // Delta: `a` sent again unchanged is not compiled again either.
        let again = listener("a", tcp, to("x"));
        client
            .take(
                LISTENER,
                Update::Delta {
                    added: vec![("a".into(), "v2".into(), again)],
                    removed: Vec::new(),
                },
            )
            .unwrap();
        let last = config.borrow().clone();
        assert!(Arc::ptr_eq(&after.listeners["a"], &last.listeners["a"]));
        assert!(Arc::ptr_eq(&after.listeners["b"], &last.listeners["b"]));
    }
}
