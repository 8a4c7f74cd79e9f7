//! The ADS protocol, state of the world and delta, over real gRPC on
//! 127.0.0.1, with a tonic client playing the proxy and a generator whose
//! resources the test sets.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use component::{
    CancellationToken,
    limits::{Limits, ServerLimits},
};
use envoy_types::pb::{
    envoy::{
        config::{cluster::v3::Cluster, core::v3::Node},
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{protobuf::Any, rpc::Status as RpcStatus},
};
use pilot::xds::{
    CLUSTER, ENDPOINT, Generated, Resource, ResourceGenerator, ResourceSet, TypeVersions,
    ads::AdsServer,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::Streaming;

/// Resources set by the test, by type and name.
struct Fixed {
    resources: Mutex<BTreeMap<&'static str, BTreeMap<String, Any>>>,
    changes: watch::Sender<TypeVersions>,
}

impl Fixed {
    fn moved(&self, type_url: &str) {
        self.changes
            .send_modify(|v| *v.entry(type_url.to_string()).or_default() += 1);
    }

    /// One change that adds a cluster and its endpoints.
    fn add_cluster_and_endpoints(&self, name: &str) {
        let mut all = self.resources.lock().unwrap();
        for t in [CLUSTER, ENDPOINT] {
            let body = Cluster {
                name: format!("{name}-r1"),
                ..Default::default()
            };
            let any = Any {
                type_url: t.into(),
                value: body.encode_to_vec(),
            };
            all.entry(t).or_default().insert(name.into(), any);
        }
        self.changes.send_modify(|v| {
            for t in [ENDPOINT, CLUSTER] {
                *v.entry(t.to_string()).or_default() += 1;
            }
        });
    }

    fn remove(&self, type_url: &'static str, name: &str) {
        self.resources
            .lock()
            .unwrap()
            .entry(type_url)
            .or_default()
            .remove(name);
        self.moved(type_url);
    }

    fn set(&self, type_url: &'static str, name: &str, revision: u32) {
        let body = Cluster {
            name: format!("{name}-r{revision}"),
            ..Default::default()
        };
        self.put(type_url, name, &body);
    }

    fn put(&self, type_url: &'static str, name: &str, body: &Cluster) {
        let any = Any {
            type_url: type_url.into(),
            value: body.encode_to_vec(),
        };
        self.resources
            .lock()
            .unwrap()
            .entry(type_url)
            .or_default()
            .insert(name.into(), any);
        self.moved(type_url);
    }
}

impl ResourceGenerator for Fixed {
    type Client = ();

    fn client(&self, node: &Node) -> Result<(), String> {
        if node.id.is_empty() {
            return Err("a node needs an id".into());
        }
        Ok(())
    }

    fn generate(&self, _client: &(), type_url: &str, names: &Arc<BTreeSet<String>>) -> Generated {
        let all = self.resources.lock().unwrap();
        let resources = all
            .get(type_url)
            .into_iter()
            .flatten()
            .filter(|(name, _)| names.is_empty() || names.contains(*name))
            .map(|(n, a)| Resource::from_any(n.as_str(), a.encode_to_vec().into()))
            .collect();
        Generated {
            shared: ResourceSet::new(resources),
            own: ResourceSet::empty(),
        }
    }

    fn changes(&self) -> watch::Receiver<TypeVersions> {
        self.changes.subscribe()
    }
}

/// A proxy's ADS stream, state of the world or delta, driven by hand.
struct AdsStream<Req, Resp> {
    requests: mpsc::Sender<Req>,
    responses: Streaming<Resp>,
}

type Proxy = AdsStream<DiscoveryRequest, DiscoveryResponse>;
type DeltaProxy = AdsStream<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// The node every proxy of these tests announces.
fn node() -> Option<Node> {
    Some(Node {
        id: "sidecar~10.0.0.1~app.ns~ns.svc.cluster.local".into(),
        ..Default::default()
    })
}

/// What a NACK says.
fn rejection(message: &str) -> RpcStatus {
    RpcStatus {
        code: 3,
        message: message.into(),
        details: vec![],
    }
}

impl<Req, Resp> AdsStream<Req, Resp> {
    /// An ADS client of `addr`, and the requests it will send.
    async fn open(
        addr: std::net::SocketAddr,
    ) -> (
        AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
        mpsc::Sender<Req>,
        ReceiverStream<Req>,
    ) {
        let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(16);
        (client, requests, ReceiverStream::new(rx))
    }

    async fn next(&mut self) -> Resp {
        tokio::time::timeout(Duration::from_secs(10), self.responses.next())
            .await
            .expect("a response in time")
            .expect("stream open")
            .expect("no error")
    }
}

impl Proxy {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let (mut client, requests, rx) = Self::open(addr).await;
        let responses = client.stream_aggregated_resources(rx).await.unwrap();
        Self {
            requests,
            responses: responses.into_inner(),
        }
    }

    async fn send(
        &self,
        type_url: &str,
        names: &[&str],
        answering: Option<&DiscoveryResponse>,
        nack: Option<&str>,
    ) {
        self.requests
            .send(DiscoveryRequest {
                node: node(),
                type_url: type_url.into(),
                resource_names: names.iter().map(|n| n.to_string()).collect(),
                version_info: answering
                    .map(|r| r.version_info.clone())
                    .unwrap_or_default(),
                response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
                error_detail: nack.map(rejection),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| Cluster::decode(&a.value[..]).unwrap().name)
        .collect()
}

async fn start() -> (Arc<Fixed>, Proxy) {
    let (generator, proxy, _) = start_with_status().await;
    (generator, proxy)
}

/// A generator with clusters and endpoints `a` and `b`, served on
/// 127.0.0.1; returns it, its address and the server's status.
async fn serve() -> (
    Arc<Fixed>,
    std::net::SocketAddr,
    pilot::xds::ads::SyncStatus,
) {
    let generator = Arc::new(Fixed {
        resources: Mutex::default(),
        changes: watch::channel(TypeVersions::default()).0,
    });
    generator.set(CLUSTER, "a", 1);
    generator.set(CLUSTER, "b", 1);
    generator.set(ENDPOINT, "a", 1);
    generator.set(ENDPOINT, "b", 1);
    let (addr, status) = serve_with(&generator, Limits::default()).await;
    (generator, addr, status)
}

async fn start_with_status() -> (Arc<Fixed>, Proxy, pilot::xds::ads::SyncStatus) {
    let (generator, addr, status) = serve().await;
    (generator, Proxy::connect(addr).await, status)
}

/// An ADS server on 127.0.0.1 for `generator`, bounded by `limits`: its
/// address and status.
async fn serve_with(
    generator: &Arc<Fixed>,
    limits: Limits,
) -> (std::net::SocketAddr, pilot::xds::ads::SyncStatus) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = AdsServer::new(generator.clone(), CancellationToken::new(), limits.clone());
    let status = server.status();
    tokio::spawn(server.serve_connections(limits.incoming(listener)));
    (addr, status)
}

#[tokio::test]
async fn subscribe_ack_and_push_on_change() {
    let (generator, mut proxy) = start().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let first = proxy.next().await;
    assert_eq!(first.type_url, CLUSTER);
    assert!(!first.nonce.is_empty() && !first.version_info.is_empty());
    assert_eq!(names(&first), ["a-r1", "b-r1"]);
    proxy.send(CLUSTER, &[], Some(&first), None).await;

    generator.set(CLUSTER, "b", 2);
    let pushed = proxy.next().await;
    assert_eq!(names(&pushed), ["a-r1", "b-r2"]);
    assert_ne!(pushed.version_info, first.version_info);
    assert_ne!(pushed.nonce, first.nonce);
}

#[tokio::test]
async fn a_nack_is_not_answered_with_a_resend() {
    let (generator, mut proxy) = start().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let first = proxy.next().await;
    proxy
        .send(CLUSTER, &[], Some(&first), Some("cannot apply cluster b"))
        .await;
    // A change of another type is the next thing to arrive: the NACKed
    // clusters were not resent.
    proxy.send(ENDPOINT, &["a"], None, None).await;
    let endpoints = proxy.next().await;
    assert_eq!(endpoints.type_url, ENDPOINT);
    proxy.send(ENDPOINT, &["a"], Some(&endpoints), None).await;
    generator.set(CLUSTER, "b", 3);
    let fixed = proxy.next().await;
    assert_eq!(fixed.type_url, CLUSTER);
    assert_eq!(names(&fixed), ["a-r1", "b-r3"]);
}

#[tokio::test]
async fn acks_and_nacks_are_recorded_per_proxy_and_type() {
    let (_generator, mut proxy, status) = start_with_status().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let clusters = proxy.next().await;
    proxy.send(ENDPOINT, &[], None, None).await;
    let endpoints = proxy.next().await;
    proxy.send(CLUSTER, &[], Some(&clusters), None).await;
    proxy
        .send(ENDPOINT, &[], Some(&endpoints), Some("bad endpoint"))
        .await;
    // A third request whose answer shows the first two were handled.
    proxy.send(pilot::xds::LISTENER, &[], None, None).await;
    proxy.next().await;
    let proxies = status.proxies();
    assert_eq!(proxies.len(), 1);
    assert_eq!(
        proxies[0].node_id,
        "sidecar~10.0.0.1~app.ns~ns.svc.cluster.local"
    );
    let cds = &proxies[0].types[CLUSTER];
    assert_eq!(
        cds.acked_version.as_deref(),
        Some(clusters.version_info.as_str())
    );
    assert_eq!(cds.last_nack, None);
    let eds = &proxies[0].types[ENDPOINT];
    assert_eq!(eds.acked_version, None);
    assert_eq!(eds.last_nack.as_deref(), Some("bad endpoint"));

    drop(proxy);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !status.proxies().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "a closed stream is forgotten"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn subscriptions_are_by_name() {
    let (generator, mut proxy) = start().await;
    proxy.send(ENDPOINT, &["a"], None, None).await;
    let only_a = proxy.next().await;
    assert_eq!(names(&only_a), ["a-r1"]);
    // A change to a resource not subscribed sends nothing; subscribing to
    // more names does.
    generator.set(ENDPOINT, "b", 2);
    proxy.send(ENDPOINT, &["a", "b"], Some(&only_a), None).await;
    let both = proxy.next().await;
    assert_eq!(names(&both), ["a-r1", "b-r2"]);
}

#[tokio::test]
async fn clusters_are_pushed_before_endpoints() {
    let (generator, mut proxy) = start().await;
    proxy.send(ENDPOINT, &[], None, None).await;
    let endpoints = proxy.next().await;
    proxy.send(ENDPOINT, &[], Some(&endpoints), None).await;
    proxy.send(CLUSTER, &[], None, None).await;
    let clusters = proxy.next().await;
    proxy.send(CLUSTER, &[], Some(&clusters), None).await;

    // One change that touches both: CDS first, then EDS.
    generator.add_cluster_and_endpoints("c");
    assert_eq!(proxy.next().await.type_url, CLUSTER);
    assert_eq!(proxy.next().await.type_url, ENDPOINT);
}

#[tokio::test]
async fn stale_nonces_are_ignored() {
    let (generator, mut proxy, status) = start_with_status().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let first = proxy.next().await;
    proxy.send(CLUSTER, &[], Some(&first), None).await;
    generator.set(CLUSTER, "a", 2);
    let second = proxy.next().await;
    // Answering the old response again is not recorded and sends nothing;
    // the next message is the push for the next change, once the current
    // response is answered.
    proxy
        .send(
            CLUSTER,
            &[],
            Some(&first),
            Some("late NACK of an old response"),
        )
        .await;
    proxy.send(CLUSTER, &[], Some(&second), None).await;
    generator.set(CLUSTER, "a", 3);
    let third = proxy.next().await;
    assert_eq!(names(&third), ["a-r3", "b-r1"]);
    assert_ne!(third.nonce, second.nonce);
    let cds = &status.proxies()[0].types[CLUSTER];
    assert_eq!(cds.last_nack, None, "the stale NACK is ignored");
    assert_eq!(
        cds.acked_version.as_deref(),
        Some(second.version_info.as_str())
    );
}

#[tokio::test]
async fn changes_while_a_response_is_unanswered_coalesce_into_one() {
    let (generator, mut proxy) = start().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let first = proxy.next().await;
    // Not answered yet: these changes wait, and only the latest goes out.
    generator.set(CLUSTER, "a", 2);
    generator.set(CLUSTER, "a", 3);
    generator.set(CLUSTER, "b", 3);
    proxy.send(ENDPOINT, &["a"], None, None).await;
    assert_eq!(
        proxy.next().await.type_url,
        ENDPOINT,
        "no cluster push while one is pending"
    );
    proxy.send(CLUSTER, &[], Some(&first), None).await;
    let latest = proxy.next().await;
    assert_eq!(latest.type_url, CLUSTER);
    assert_eq!(names(&latest), ["a-r3", "b-r3"]);
}

#[tokio::test]
async fn a_malformed_node_ends_the_stream_with_invalid_argument() {
    let (_generator, addr, _) = serve().await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = DiscoveryRequest {
        node: Some(Node::default()),
        type_url: CLUSTER.into(),
        ..Default::default()
    };
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::iter([request]).chain(tokio_stream::pending()))
        .await
        .unwrap()
        .into_inner();
    let status = responses.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("needs an id"), "{status:?}");
}

#[tokio::test]
async fn a_reconnecting_proxy_gets_the_full_state_again() {
    let (generator, mut proxy) = start().await;
    proxy.send(CLUSTER, &[], None, None).await;
    let first = proxy.next().await;
    proxy.send(CLUSTER, &[], Some(&first), None).await;
    drop(proxy);
    generator.set(CLUSTER, "a", 2);
    let mut again = reconnect(&generator).await;
    again.send(CLUSTER, &[], None, None).await;
    assert_eq!(names(&again.next().await), ["a-r2", "b-r1"]);
}

/// A new server on the same generator, and a proxy connected to it.
async fn reconnect(generator: &Arc<Fixed>) -> Proxy {
    let (addr, _) = serve_with(generator, Limits::default()).await;
    Proxy::connect(addr).await
}

impl DeltaProxy {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let (mut client, requests, rx) = Self::open(addr).await;
        let responses = client.delta_aggregated_resources(rx).await.unwrap();
        Self {
            requests,
            responses: responses.into_inner(),
        }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        let request = DeltaDiscoveryRequest {
            node: node(),
            ..request
        };
        self.requests.send(request).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse, nack: Option<&str>) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: nack.map(rejection),
            ..Default::default()
        })
        .await;
    }
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|res| {
            Cluster::decode(&res.resource.as_ref().unwrap().value[..])
                .unwrap()
                .name
        })
        .collect()
}

#[tokio::test]
async fn delta_sends_only_what_changed_and_what_was_removed() {
    let (generator, addr, status) = serve().await;
    let mut proxy = DeltaProxy::connect(addr).await;
    proxy.subscribe(CLUSTER, &[]).await;
    let first = proxy.next().await;
    assert_eq!(delta_names(&first), ["a-r1", "b-r1"]);
    assert!(first.removed_resources.is_empty());
    proxy.ack(&first, None).await;

    generator.set(CLUSTER, "b", 2);
    let changed = proxy.next().await;
    assert_eq!(delta_names(&changed), ["b-r2"], "only the changed resource");
    proxy.ack(&changed, None).await;
    // Answers are to the latest response: let this one land before the
    // next change.
    let acked = || status.proxies()[0].types[CLUSTER].acked_version.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acked().as_deref() != Some(changed.system_version_info.as_str()) {
        assert!(std::time::Instant::now() < deadline, "the ACK is recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    generator.remove(CLUSTER, "a");
    let removed = proxy.next().await;
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, ["a"]);
    proxy.ack(&removed, Some("cannot remove a")).await;

    // The status shows the ACK of the second response and the NACK.
    generator.set(ENDPOINT, "a", 2);
    proxy.subscribe(ENDPOINT, &["a"]).await;
    proxy.next().await;
    let proxies = status.proxies();
    assert_eq!(proxies[0].protocol, "delta");
    let cds = &proxies[0].types[CLUSTER];
    assert_eq!(
        cds.acked_version.as_deref(),
        Some(changed.system_version_info.as_str())
    );
    assert_eq!(cds.last_nack.as_deref(), Some("cannot remove a"));
}

#[tokio::test]
async fn delta_subscribes_and_unsubscribes_by_name() {
    let (generator, addr, _) = serve().await;
    let mut proxy = DeltaProxy::connect(addr).await;
    proxy.subscribe(ENDPOINT, &["a"]).await;
    let only_a = proxy.next().await;
    assert_eq!(delta_names(&only_a), ["a-r1"]);
    proxy.ack(&only_a, None).await;

    // A change to an unsubscribed resource sends nothing; subscribing to
    // it sends it alone.
    generator.set(ENDPOINT, "b", 2);
    proxy.subscribe(ENDPOINT, &["b"]).await;
    let b = proxy.next().await;
    assert_eq!(delta_names(&b), ["b-r2"]);
    proxy.ack(&b, None).await;

    // After unsubscribing `a`, its changes are not sent; `b`'s are.
    proxy
        .send(DeltaDiscoveryRequest {
            type_url: ENDPOINT.into(),
            resource_names_unsubscribe: vec!["a".into()],
            ..Default::default()
        })
        .await;
    // A request with an answer, so that the unsubscribe has been applied.
    proxy.subscribe(CLUSTER, &[]).await;
    proxy.next().await;
    generator.set(ENDPOINT, "a", 3);
    generator.set(ENDPOINT, "b", 3);
    let next = proxy.next().await;
    assert_eq!(delta_names(&next), ["b-r3"]);
    assert!(next.removed_resources.is_empty());
}

#[tokio::test]
async fn delta_reconnect_with_initial_versions_gets_only_differences() {
    let (generator, addr, _) = serve().await;
    let mut proxy = DeltaProxy::connect(addr).await;
    proxy.subscribe(CLUSTER, &[]).await;
    let first = proxy.next().await;
    let held: std::collections::HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(proxy);

    generator.set(CLUSTER, "a", 2);
    let mut again = DeltaProxy::connect(addr).await;
    again
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            initial_resource_versions: held,
            ..Default::default()
        })
        .await;
    let diff = again.next().await;
    assert_eq!(delta_names(&diff), ["a-r2"], "b is held at its version");
}

#[tokio::test]
async fn delta_pushes_clusters_before_endpoints() {
    let (generator, addr, _) = serve().await;
    let mut proxy = DeltaProxy::connect(addr).await;
    proxy.subscribe(ENDPOINT, &[]).await;
    let endpoints = proxy.next().await;
    proxy.ack(&endpoints, None).await;
    proxy.subscribe(CLUSTER, &[]).await;
    let clusters = proxy.next().await;
    proxy.ack(&clusters, None).await;
    generator.add_cluster_and_endpoints("c");
    assert_eq!(proxy.next().await.type_url, CLUSTER);
    assert_eq!(proxy.next().await.type_url, ENDPOINT);
}

#[tokio::test]
async fn large_responses_arrive_whole_in_one_message() {
    let (generator, addr, _) = serve().await;
    // Megabytes: many chunks of Pilot's encoding.
    let padding = "x".repeat(1_000);
    let large = |i: usize| Cluster {
        name: format!("c{i:04}"),
        alt_stat_name: padding.clone(),
        ..Default::default()
    };
    for i in 0..2_500 {
        generator.put(CLUSTER, &format!("c{i:04}"), &large(i));
    }
    let expected: Vec<Cluster> = (0..2_500).map(large).collect();
    let clusters = |bodies: Vec<&Any>| -> Vec<Cluster> {
        bodies
            .into_iter()
            .map(|a| Cluster::decode(&a.value[..]).unwrap())
            .filter(|c| c.name.starts_with('c'))
            .collect()
    };

    let mut proxy = Proxy::connect(addr).await;
    proxy.send(CLUSTER, &[], None, None).await;
    let response = proxy.next().await;
    assert_eq!(response.resources.len(), 2_502);
    assert_eq!(clusters(response.resources.iter().collect()), expected);

    let mut delta = DeltaProxy::connect(addr).await;
    delta.subscribe(CLUSTER, &[]).await;
    let response = delta.next().await;
    assert_eq!(response.resources.len(), 2_502);
    assert!(response.resources.iter().all(|r| r.version.len() == 16));
    let bodies = response
        .resources
        .iter()
        .filter(|r| r.name.starts_with('c'));
    let names: Vec<&str> = bodies.clone().map(|r| r.name.as_str()).collect();
    let received = clusters(bodies.map(|r| r.resource.as_ref().unwrap()).collect());
    assert_eq!(received, expected);
    assert!(names.iter().zip(&received).all(|(n, c)| *n == c.name));
}

/// ADS served with the limits `pilot` takes as flags: a request over
/// `--max-message-bytes` ends its stream with OUT_OF_RANGE, and a
/// connection at `--max-streams-per-connection` is counted.
#[tokio::test]
async fn requests_over_the_size_limit_and_connections_at_the_stream_limit_are_counted() {
    let (generator, _, _) = serve().await;
    let limits = Limits::unregistered(&ServerLimits {
        max_message_bytes: Some(512),
        max_streams_per_connection: 1,
        ..Default::default()
    });
    let (addr, _) = serve_with(&generator, limits.clone()).await;

    let mut proxy = Proxy::connect(addr).await;
    proxy.send(CLUSTER, &[], None, None).await;
    proxy.next().await;
    assert_eq!(limits.reached("streams_per_connection"), 1);
    let names: Vec<String> = (0..100).map(|i| format!("cluster-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    proxy.send(ENDPOINT, &names, None, None).await;
    let status = tokio::time::timeout(Duration::from_secs(10), proxy.responses.next())
        .await
        .expect("the stream's end in time")
        .expect("a status")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(limits.reached("message_bytes"), 1);
}
