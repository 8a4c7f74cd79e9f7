//! `meshctl bench pilot`: the Pilot binary with many services and many
//! simulated proxies, all connected over ADS from this process, each
//! behaving as Envoy does (clusters, then their endpoints by name;
//! listeners, then their routes by name; every response ACKed). Config
//! comes from an MCP source in this process, so Pilot's figures are its
//! own. It measures the time until every proxy has ACKed its initial
//! config, from one VirtualService change until every proxy has ACKed the
//! new routes, and from one endpoint change until every proxy has ACKed the
//! new endpoints, with Pilot's CPU seconds and its RSS.
//!
//! Each xDS flavour (state of the world and delta) runs twice: with one
//! stream per connection, as Envoy does, and with many streams on a
//! connection; each run against a fresh Pilot. A run with fewer proxies
//! first gives the RSS that every further proxy adds. Change times are
//! stated with Pilot's debounce and beyond it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use component::CancellationToken;
use envoy_types::pb::envoy::{
    config::{
        cluster::v3::cluster::DiscoveryType,
        core::v3::Node,
        listener::v3::{Listener, filter},
    },
    extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    },
    service::discovery::v3::DeltaDiscoveryRequest,
};
use mcp::Store;
use mesh_api::{kinds, object::ConfigObject};
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::{Component, cpu_seconds, ms};

#[derive(Debug, Args)]
pub struct PilotBenchArgs {
    #[arg(long, default_value_t = 1_000)]
    pub services: usize,
    /// Simulated proxies; proxy `i` is a replica of service `i % services`.
    #[arg(long, default_value_t = 2_000)]
    pub proxies: usize,
    /// Proxies of the smaller run, whose RSS against the full run's gives
    /// the RSS per proxy.
    #[arg(long, default_value_t = 200)]
    pub baseline_proxies: usize,
    #[arg(long, default_value_t = 10)]
    pub namespaces: usize,
    /// ADS streams multiplexed on one HTTP/2 connection in the many-streams
    /// runs (the others have one stream per connection).
    #[arg(long, default_value_t = 50)]
    pub streams_per_connection: usize,
    /// Pilot's `--debounce`: the quiet time after a change before a push.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub debounce: Duration,
    /// Directory holding the pilot binary; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

use mesh_api::xds::{CLUSTER as CDS, ENDPOINT as EDS, LISTENER as LDS, ROUTE as RDS};
const TYPES: [&str; 4] = [CDS, EDS, LDS, RDS];

/// What the VirtualService change adds, found in the routes that carry it.
const ROUTE_MARKER: &str = "bench-route-revision-2";
/// The endpoint the endpoint change adds.
const ENDPOINT_MARKER: &str = "10.250.250.250";

fn namespace(service: usize, args: &PilotBenchArgs) -> String {
    format!("bench-{}", service % args.namespaces)
}

fn ip(service: usize, replica: usize) -> String {
    format!(
        "10.{}.{}.{}",
        service / 256 % 250,
        service % 256,
        replica + 1
    )
}

/// The config: per service a ServiceEntry (an HTTP and a TCP port, two
/// replicas), a DestinationRule with two subsets; a VirtualService for
/// every tenth. Revision 2 changes service 0's VirtualService; revision 3
/// also adds an endpoint to service 1.
fn config(args: &PilotBenchArgs, revision: u32) -> Vec<String> {
    let mut docs = Vec::new();
    for s in 0..args.services {
        let ns = namespace(s, args);
        let host = format!("svc-{s}.{ns}.svc.cluster.local");
        let extra = if revision >= 3 && s == 1 {
            format!("\n  - {{address: {ENDPOINT_MARKER}, labels: {{app: svc-{s}, version: v1}}}}")
        } else {
            String::new()
        };
        docs.push(format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  resolution: STATIC\n  ports: [{{number: 9080, name: http, protocol: HTTP}}, {{number: 9090, name: tcp, protocol: TCP}}]\n  endpoints:\n  - {{address: {}, labels: {{app: svc-{s}, version: v1}}}}\n  - {{address: {}, labels: {{app: svc-{s}, version: v2}}}}{extra}\n",
            ip(s, 0),
            ip(s, 1),
        ));
        docs.push(format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec:\n  host: {host}\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: 100}}}}}}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
        ));
        if s % 10 == 0 {
            let marker = if revision >= 2 && s == 0 {
                ROUTE_MARKER
            } else {
                "bench-route-revision-1"
            };
            docs.push(format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: svc-{s}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: {host}, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: {host}, subset: v1}}, weight: 90}}\n    - {{destination: {{host: {host}, subset: v2}}, weight: 10}}\n    headers: {{request: {{set: {{x-bench: {marker}}}}}}}\n"
            ));
        }
    }
    docs
}

fn publish(store: &Store, docs: &[String]) -> anyhow::Result<()> {
    let mut objects = Vec::new();
    for doc in docs {
        objects.extend(
            ConfigObject::parse_yaml(doc, "bench.yaml").map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    store.replace_with_objects(
        &[
            kinds::SERVICE_ENTRIES,
            kinds::DESTINATION_RULES,
            kinds::VIRTUAL_SERVICES,
        ],
        &objects,
    )?;
    Ok(())
}

/// A `DiscoveryResponse` as the simulated proxies read it: each resource's
/// `Any` stays a slice of the response's bytes (a message and `bytes` are
/// alike on the wire), so that the load generator, on the same cores as
/// Pilot, spends little of them.
#[derive(Clone, PartialEq, prost::Message)]
struct SotwResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    resources: Vec<Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

/// A `DeltaDiscoveryResponse`, read as lightly.
#[derive(Clone, PartialEq, prost::Message)]
struct DeltaResponse {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<DeltaResource>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
    #[prost(string, repeated, tag = "6")]
    removed_resources: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeltaResource {
    #[prost(bytes = "bytes", tag = "2")]
    resource: Bytes,
    #[prost(string, tag = "3")]
    name: String,
}

/// A `DiscoveryRequest` whose names are shared buffers: the simulated
/// proxies of a scope repeat the same thousands of names in every ACK.
#[derive(Clone, PartialEq, prost::Message)]
struct SotwRequest {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, optional, tag = "2")]
    node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
}

/// An `Any`'s message.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyValue {
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// A cluster's name and discovery type; the rest is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct ClusterHead {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int32, tag = "2")]
    discovery_type: i32,
}

/// A quick hash of a resource's bytes, to know one seen before.
fn quick_hash(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut h = bytes.len() as u64;
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        h = (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(23);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// What a proxy learns from a resource: the names it subscribes to next
/// (its EDS cluster name from a cluster, route configuration names from a
/// listener). Proxies receive equal bytes, so each body is read once, and
/// proxies with equal responses share one list of what they lead to.
#[derive(Default)]
struct Names {
    by_body: Mutex<HashMap<u64, Arc<Vec<Bytes>>>>,
    by_response: Mutex<HashMap<u64, Arc<Vec<Bytes>>>>,
}

impl Names {
    fn of(&self, type_url: &str, any: &[u8]) -> Arc<Vec<Bytes>> {
        let key = quick_hash(any);
        if let Some(names) = self.by_body.lock().unwrap().get(&key) {
            return names.clone();
        }
        let value = AnyValue::decode(any).map(|a| a.value).unwrap_or_default();
        let names: Vec<String> = match type_url {
            CDS => ClusterHead::decode(value)
                .ok()
                .filter(|c| c.discovery_type == DiscoveryType::Eds as i32)
                .map(|c| c.name)
                .into_iter()
                .collect(),
            LDS => Listener::decode(value)
                .ok()
                .into_iter()
                .flat_map(|l| l.filter_chains)
                .flat_map(|c| c.filters)
                .filter_map(|f| match f.config_type {
                    Some(filter::ConfigType::TypedConfig(any))
                        if f.name.ends_with("http_connection_manager") =>
                    {
                        match HttpConnectionManager::decode(&any.value[..])
                            .ok()?
                            .route_specifier
                        {
                            Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let names = Arc::new(names.into_iter().map(Bytes::from).collect());
        self.by_body.lock().unwrap().insert(key, Arc::clone(&names));
        names
    }

    /// The names all of `resources` lead to, in order.
    fn all(&self, type_url: &str, resources: &[Bytes]) -> Arc<Vec<Bytes>> {
        let key = resources
            .iter()
            .fold(0u64, |h, r| h.rotate_left(5) ^ quick_hash(r));
        if let Some(names) = self.by_response.lock().unwrap().get(&key) {
            return names.clone();
        }
        let set: BTreeSet<Bytes> = resources
            .iter()
            .flat_map(|r| self.of(type_url, r).to_vec())
            .collect();
        let names = Arc::new(set.into_iter().collect());
        self.by_response
            .lock()
            .unwrap()
            .insert(key, Arc::clone(&names));
        names
    }
}

fn contains(resources: &[Bytes], needle: &str) -> bool {
    let finder = memchr::memmem::Finder::new(needle);
    resources.iter().any(|a| finder.find(a).is_some())
}

/// What proxies report to the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Event {
    /// Every type ACKed once.
    Initial,
    RoutesChanged,
    EndpointsChanged,
}

/// Shared by the simulated proxies.
struct Shared {
    names: Names,
    /// Outbound EDS clusters every proxy sees: a complete config has them.
    clusters: usize,
    events: mpsc::UnboundedSender<Event>,
    /// The benchmark's phase, and responses received per phase and type.
    phase: AtomicU8,
    responses: [[AtomicU64; 4]; 4],
    /// Bytes of the responses received per phase, by every proxy.
    bytes: [AtomicU64; 4],
    /// Bytes of the requests sent per phase, by every proxy.
    request_bytes: [AtomicU64; 4],
}

impl Shared {
    fn count_request(&self, bytes: usize) {
        let phase = self.phase.load(Ordering::Relaxed) as usize;
        self.request_bytes[phase].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn count(&self, type_url: &str, bytes: usize) {
        let phase = self.phase.load(Ordering::Relaxed) as usize;
        self.bytes[phase].fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(t) = TYPES.iter().position(|t| *t == type_url) {
            self.responses[phase][t].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The phases whose traffic is reported, by name.
const PHASES: [(usize, &str); 3] = [
    (0, "initial_config"),
    (ROUTES_PHASE as usize, "virtual_service_change"),
    (ENDPOINTS_PHASE as usize, "endpoint_change"),
];

/// The phase in which the VirtualService change is made, and the one in
/// which the endpoint change is.
const ROUTES_PHASE: u8 = 1;
const ENDPOINTS_PHASE: u8 = 2;

/// One proxy's progress, the same for both flavours.
#[derive(Default)]
struct Progress {
    /// Resources held per type (all of a response's for state of the
    /// world; what the proxy holds after a delta).
    held: BTreeMap<String, usize>,
    initial: bool,
    routes: bool,
    endpoints: bool,
}

impl Progress {
    /// Records a response whose `resources` were ACKed, after which the
    /// proxy holds `held` resources of its type.
    fn on_ack(&mut self, type_url: &str, resources: &[Bytes], held: usize, shared: &Shared) {
        self.held.insert(type_url.to_string(), held);
        // Delta responses come in pages: the initial config is complete once
        // every outbound cluster and its endpoints are held.
        let count = |t: &str| self.held.get(t).copied();
        let complete = count(CDS) >= Some(shared.clusters)
            && count(EDS) >= Some(shared.clusters)
            && count(LDS).is_some()
            && count(RDS).is_some();
        if !self.initial && complete {
            self.initial = true;
            let _ = shared.events.send(Event::Initial);
        }
        // The markers are looked for only once their change is made.
        let phase = shared.phase.load(Ordering::Relaxed);
        if type_url == RDS
            && !self.routes
            && phase >= ROUTES_PHASE
            && contains(resources, ROUTE_MARKER)
        {
            self.routes = true;
            let _ = shared.events.send(Event::RoutesChanged);
        }
        if type_url == EDS
            && !self.endpoints
            && phase >= ENDPOINTS_PHASE
            && contains(resources, ENDPOINT_MARKER)
        {
            self.endpoints = true;
            let _ = shared.events.send(Event::EndpointsChanged);
        }
    }
}

fn node(i: usize, args: &PilotBenchArgs) -> Node {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let (service, replica) = (i % args.services, i / args.services);
    let ns = namespace(service, args);
    let string = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    let labels = Struct {
        fields: [
            ("app".to_string(), string(format!("svc-{service}"))),
            (
                "version".to_string(),
                string(format!("v{}", replica % 2 + 1)),
            ),
        ]
        .into_iter()
        .collect(),
    };
    Node {
        id: format!(
            "sidecar~{}~svc-{service}-{replica}.{ns}~{ns}.svc.cluster.local",
            ip(service, replica % 2)
        ),
        metadata: Some(Struct {
            fields: [(
                "LABELS".to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

/// Opens an ADS stream of `method` on `channel` with the light messages.
async fn open<Req, Resp>(
    channel: Channel,
    method: &'static str,
    requests: mpsc::UnboundedReceiver<Req>,
    shared: Arc<Shared>,
) -> anyhow::Result<tonic::Streaming<Resp>>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(requests).map(move |r| {
        shared.count_request(r.encoded_len());
        r
    });
    Ok(grpc
        .streaming(tonic::Request::new(requests), path, codec)
        .await?
        .into_inner())
}

async fn sotw_proxy(
    channel: Channel,
    node: Node,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel::<SotwRequest>();
    // `answering` is the (version, nonce) of the response answered.
    let request =
        |type_url: &str, names: &[Bytes], answering: Option<&(String, String)>| SotwRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names: names.to_vec(),
            version_info: answering.map(|a| a.0.clone()).unwrap_or_default(),
            response_nonce: answering.map(|a| a.1.clone()).unwrap_or_default(),
        };
    let none: Arc<Vec<Bytes>> = Arc::default();
    let mut subscribed: BTreeMap<&str, Arc<Vec<Bytes>>> = [(CDS, none.clone()), (LDS, none)].into();
    let mut last: BTreeMap<&str, (String, String)> = BTreeMap::new();
    tx.send(request(CDS, &subscribed[CDS], None))?;
    tx.send(request(LDS, &subscribed[LDS], None))?;
    let mut responses = open::<_, SotwResponse>(
        channel,
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        rx,
        shared.clone(),
    )
    .await?;
    let mut progress = Progress::default();
    loop {
        let response = tokio::select! {
            r = responses.next() => match r {
                Some(r) => r?,
                None => return Ok(()),
            },
            _ = stop.cancelled() => return Ok(()),
        };
        shared.count(&response.type_url, response.encoded_len());
        let t = TYPES
            .iter()
            .copied()
            .find(|t| *t == response.type_url)
            .unwrap_or(CDS);
        let follow = match t {
            CDS => Some(EDS),
            LDS => Some(RDS),
            _ => None,
        };
        let answered = (response.version_info.clone(), response.nonce.clone());
        tx.send(request(t, &subscribed[t], Some(&answered)))?;
        let resources = &response.resources;
        progress.on_ack(t, resources, resources.len(), &shared);
        if let Some(next) = follow {
            let names = shared.names.all(t, resources);
            if subscribed.get(next) != Some(&names) {
                tx.send(request(next, &names, last.get(next)))?;
                subscribed.insert(next, names);
            }
        }
        last.insert(t, answered);
    }
}

async fn delta_proxy(
    channel: Channel,
    node: Node,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    let subscribe = |type_url: &str, add: Vec<String>, remove: Vec<String>| DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: type_url.into(),
        resource_names_subscribe: add,
        resource_names_unsubscribe: remove,
        ..Default::default()
    };
    tx.send(subscribe(CDS, vec![], vec![]))?;
    tx.send(subscribe(LDS, vec![], vec![]))?;
    let mut responses = open::<_, DeltaResponse>(
        channel,
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        rx,
        shared.clone(),
    )
    .await?;
    // Per type and resource held, the names it leads to; what the proxy
    // subscribed to.
    // Names are kept by hash: what they lead to and how many are held is
    // all the benchmark needs of them.
    let mut held: BTreeMap<&str, HashMap<u64, Arc<Vec<Bytes>>>> = BTreeMap::new();
    let mut subscribed: BTreeMap<&str, BTreeSet<Bytes>> = BTreeMap::new();
    let mut progress = Progress::default();
    let mut held_names: BTreeMap<&str, std::collections::HashSet<u64>> = BTreeMap::new();
    let hash = |name: &str| quick_hash(name.as_bytes());
    loop {
        let response: DeltaResponse = tokio::select! {
            r = responses.next() => match r {
                Some(r) => r?,
                None => return Ok(()),
            },
            _ = stop.cancelled() => return Ok(()),
        };
        shared.count(&response.type_url, response.encoded_len());
        let t = TYPES
            .iter()
            .copied()
            .find(|t| *t == response.type_url)
            .unwrap_or(CDS);
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })?;
        let changed: Vec<Bytes> = response
            .resources
            .iter()
            .map(|r| r.resource.clone())
            .collect();
        let count = held_names.entry(t).or_default();
        count.extend(response.resources.iter().map(|r| hash(&r.name)));
        for name in &response.removed_resources {
            count.remove(&hash(name));
        }
        progress.on_ack(t, &changed, count.len(), &shared);
        let follow = match t {
            CDS => Some(EDS),
            LDS => Some(RDS),
            _ => None,
        };
        if let Some(next) = follow {
            let state = held.entry(t).or_default();
            for r in &response.resources {
                state.insert(hash(&r.name), shared.names.of(t, &r.resource));
            }
            for name in &response.removed_resources {
                state.remove(&hash(name));
            }
            let names: BTreeSet<Bytes> = state.values().flat_map(|n| n.iter().cloned()).collect();
            let current = subscribed.entry(next).or_default();
            let utf8 = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
            let add: Vec<String> = names.difference(current).map(utf8).collect();
            let remove: Vec<String> = current.difference(&names).map(utf8).collect();
            if !add.is_empty() || !remove.is_empty() {
                *current = names;
                tx.send(subscribe(next, add, remove))?;
            }
        }
    }
}

/// Waits for `count` events of `kind`; returns when the last arrived.
async fn wait_for(
    events: &mut mpsc::UnboundedReceiver<Event>,
    kind: Event,
    count: usize,
) -> anyhow::Result<Instant> {
    let mut seen = 0;
    while seen < count {
        let event = tokio::time::timeout(Duration::from_secs(300), events.recv())
            .await
            .map_err(|_| {
                anyhow::anyhow!("{seen} of {count} proxies reported {kind:?} within 300s")
            })?
            .ok_or_else(|| anyhow::anyhow!("proxies stopped"))?;
        if event == kind {
            seen += 1;
        }
    }
    Ok(Instant::now())
}

/// One run: a flavour, a number of proxies and of streams per connection.
#[derive(Clone, Copy)]
struct Run {
    delta: bool,
    proxies: usize,
    streams_per_connection: usize,
}

async fn phase(
    args: &PilotBenchArgs,
    bins: &std::path::Path,
    run: Run,
) -> anyhow::Result<serde_json::Value> {
    let Run {
        delta,
        proxies,
        streams_per_connection,
    } = run;
    let store = Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)));
    publish(&store, &config(args, 1))?;
    let stop = CancellationToken::new();
    let mcp = super::serve_mcp(store.clone(), &stop).await?;
    let xds = launch::free_addr()?;
    let mut pilot = Component::pilot(bins, mcp, xds, Some(args.debounce)).await?;
    let pid = pilot.pid();
    let cpu_at_ready = cpu_seconds(pid)?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        names: Names::default(),
        // Two ports, each with the whole service and two subsets.
        clusters: args.services * 2 * 3,
        events: events_tx,
        phase: AtomicU8::new(0),
        responses: Default::default(),
        bytes: Default::default(),
        request_bytes: Default::default(),
    });
    let connect = Instant::now();
    for group in 0..proxies.div_ceil(streams_per_connection) {
        let channel = Channel::from_shared(format!("http://{xds}"))?
            .connect()
            .await?;
        let first = group * streams_per_connection;
        for i in first..(first + streams_per_connection).min(proxies) {
            let (channel, node, shared, stop) =
                (channel.clone(), node(i, args), shared.clone(), stop.clone());
            tokio::spawn(async move {
                let result = if delta {
                    delta_proxy(channel, node, shared, stop.clone()).await
                } else {
                    sotw_proxy(channel, node, shared, stop.clone()).await
                };
                if let Err(e) = result
                    && !stop.is_cancelled()
                {
                    eprintln!("bench pilot: proxy {i}: {e:#}");
                }
            });
        }
    }
    let initial = wait_for(&mut events, Event::Initial, proxies).await? - connect;
    let cpu_initial = cpu_seconds(pid)?;
    let rss_after_initial = super::rss_bytes(pid, "VmRSS:")?;

    shared.phase.store(ROUTES_PHASE, Ordering::Relaxed);
    let change = Instant::now();
    publish(&store, &config(args, 2))?;
    let routes = wait_for(&mut events, Event::RoutesChanged, proxies).await? - change;
    let cpu_routes = cpu_seconds(pid)?;

    shared.phase.store(ENDPOINTS_PHASE, Ordering::Relaxed);
    let change = Instant::now();
    publish(&store, &config(args, 3))?;
    let endpoints = wait_for(&mut events, Event::EndpointsChanged, proxies).await? - change;
    let cpu_endpoints = cpu_seconds(pid)?;
    // Late responses of the last change land in its phase.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shared.phase.store(3, Ordering::Relaxed);

    let peak_rss = super::rss_bytes(pid, "VmHWM:")?;
    stop.cancel();
    if let Err(e) = pilot.terminate().await {
        eprintln!("bench pilot: {e:#}");
    }
    let responses = |phase: usize| -> serde_json::Value {
        let counts: serde_json::Map<String, serde_json::Value> = ["CDS", "EDS", "LDS", "RDS"]
            .iter()
            .enumerate()
            .map(|(t, name)| {
                (
                    name.to_string(),
                    shared.responses[phase][t].load(Ordering::Relaxed).into(),
                )
            })
            .collect();
        counts.into()
    };
    let beyond_debounce = |d: Duration| ms(d.saturating_sub(args.debounce));
    let bytes = |phase: usize| {
        let [responses, requests] =
            [&shared.bytes, &shared.request_bytes].map(|b| b[phase].load(Ordering::Relaxed));
        (responses, requests)
    };
    let megabytes = |b: u64| (b as f64 / 1e3).round() / 1e3;
    // The floor each phase's traffic sets: its bytes, both ways, moved
    // over one loopback connection with nothing else to do (the best of
    // three, as a floor is).
    let mut floor = serde_json::Map::new();
    for (phase, name) in PHASES {
        let (responses, requests) = bytes(phase);
        let mut best = Duration::MAX;
        for _ in 0..3 {
            best = best.min(loopback_floor(responses + requests).await?);
        }
        floor.insert(name.into(), ms(best).into());
    }
    let by_phase = |value: &dyn Fn(usize) -> f64| -> serde_json::Value {
        PHASES
            .iter()
            .map(|(phase, name)| (name.to_string(), value(*phase).into()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    Ok(json!({
        "protocol": if delta { "delta" } else { "sotw" },
        "proxies": proxies,
        "streams_per_connection": streams_per_connection,
        "ms_until_every_proxy_acked_initial_config": ms(initial),
        "ms_from_virtual_service_change_until_every_proxy_acked": ms(routes),
        "ms_beyond_debounce_virtual_service_change": beyond_debounce(routes),
        "ms_from_endpoint_change_until_every_proxy_acked": ms(endpoints),
        "ms_beyond_debounce_endpoint_change": beyond_debounce(endpoints),
        "cpu_seconds_initial_config": round(cpu_initial - cpu_at_ready),
        "cpu_seconds_virtual_service_change": round(cpu_routes - cpu_initial),
        "cpu_seconds_endpoint_change": round(cpu_endpoints - cpu_routes),
        "cpu_seconds_total": round(cpu_endpoints),
        "rss_after_initial_config_bytes": rss_after_initial,
        "peak_rss_bytes": peak_rss,
        "responses_initial": responses(0),
        "responses_after_virtual_service_change": responses(1),
        "responses_after_endpoint_change": responses(2),
        "megabytes_of_responses": by_phase(&|p| megabytes(bytes(p).0)),
        "megabytes_of_requests": by_phase(&|p| megabytes(bytes(p).1)),
        "ms_to_move_those_bytes_over_one_loopback_connection": floor,
    }))
}

/// How long moving `bytes` over one loopback TCP connection takes, in
/// writes of 1 MiB: what no push of as many bytes can beat on this
/// machine.
async fn loopback_floor(bytes: u64) -> anyhow::Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0u64;
        while read < bytes {
            match socket.read(&mut buf).await? {
                0 => break,
                n => read += n as u64,
            }
        }
        anyhow::Ok(())
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut written = 0u64;
    while written < bytes {
        let n = chunk.len().min((bytes - written) as usize);
        socket.write_all(&chunk[..n]).await?;
        written += n as u64;
    }
    socket.shutdown().await?;
    reader.await??;
    Ok(start.elapsed())
}

fn round(seconds: f64) -> f64 {
    (seconds * 100.0).round() / 100.0
}

pub async fn run(args: PilotBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.services > 1
            && args.namespaces > 0
            && args.streams_per_connection > 0
            && args.baseline_proxies > 0
            && args.baseline_proxies < args.proxies,
        "--services must be above 1, --namespaces and --streams-per-connection above 0, \
         --baseline-proxies above 0 and below --proxies"
    );
    super::raise_open_files_limit()?;
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    eprintln!(
        "bench pilot: {} services, {} proxies",
        args.services, args.proxies
    );
    let mut runs = Vec::new();
    let mut per_proxy = Vec::new();
    for delta in [false, true] {
        for streams_per_connection in [1, args.streams_per_connection] {
            let run = |proxies| Run {
                delta,
                proxies,
                streams_per_connection,
            };
            let small = phase(&args, &bins, run(args.baseline_proxies)).await?;
            let full = phase(&args, &bins, run(args.proxies)).await?;
            let rss = |r: &serde_json::Value| r["rss_after_initial_config_bytes"].as_f64();
            if let (Some(a), Some(b)) = (rss(&small), rss(&full)) {
                per_proxy.push(json!({
                    "protocol": full["protocol"],
                    "streams_per_connection": streams_per_connection,
                    "rss_bytes_per_proxy":
                        ((b - a) / (args.proxies - args.baseline_proxies) as f64).round(),
                }));
            }
            runs.extend([small, full]);
        }
    }
    let figures = json!({
        "benchmark": "pilot",
        "services": args.services,
        "proxies": args.proxies,
        "baseline_proxies": args.baseline_proxies,
        "namespaces": args.namespaces,
        "debounce_ms": ms(args.debounce),
        "runs": runs,
        "rss_per_proxy": per_proxy,
        "istio_1_1_published_for_this_load": {"vcpu": 1, "memory_bytes": 1_500_000_000u64},
    });
    super::report(&figures, args.out.as_deref())
}
