//! Clusters and endpoints as a proxy receives them, from config that
//! reaches Pilot over the real MCP path (a source on 127.0.0.1 serving
//! parsed YAML), asserted on their content.

use std::{sync::Arc, time::Duration};

use component::{Admin, CancellationToken};
use envoy_types::pb::envoy::{
    config::{
        cluster::v3::Cluster,
        core::v3::{Node, address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
    },
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use mcp_proto::{
    kinds,
    mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store},
    object::ConfigObject,
};
use pilot::xds::{CLUSTER, ENDPOINT};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

const CONFIG: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, ports: {http: 19080}, labels: {version: v1}, locality: us-east/zone-a}
  - {address: 10.0.0.2, labels: {version: v2}, locality: us-east/zone-b}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

async fn publish(store: &Store, yaml: &str) {
    let objects = ConfigObject::parse_yaml(yaml, "test.yaml").unwrap();
    for collection in [kinds::SERVICE_ENTRIES, kinds::DESTINATION_RULES] {
        let resources = objects
            .iter()
            .filter(|o| o.kind.collection == collection)
            .map(|o| o.to_resource())
            .collect();
        store.replace(collection, resources).unwrap();
    }
}

fn free() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Proxy {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    /// The names subscribed, by type; ACKs repeat them.
    names: std::collections::BTreeMap<String, Vec<String>>,
}

impl Proxy {
    async fn connect(xds: std::net::SocketAddr) -> Self {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut client = loop {
            match AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await {
                Ok(c) => break c,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("pilot's ADS port: {e}"),
            }
        };
        let (requests, rx) = mpsc::channel(8);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            requests,
            responses,
            names: Default::default(),
        }
    }

    async fn request(
        &mut self,
        type_url: &str,
        names: &[&str],
        answering: Option<&DiscoveryResponse>,
    ) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.names.insert(type_url.to_string(), names.clone());
        self.requests
            .send(DiscoveryRequest {
                node: Some(Node {
                    id: "sidecar~10.0.0.9~productpage.shop~shop.svc.cluster.local".into(),
                    ..Default::default()
                }),
                type_url: type_url.into(),
                resource_names: names,
                response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
                version_info: answering
                    .map(|r| r.version_info.clone())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Responses until one satisfies `done`, ACKing each.
    async fn until(&mut self, done: impl Fn(&DiscoveryResponse) -> bool) -> DiscoveryResponse {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(10), self.responses.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let names = self.names.get(&r.type_url).cloned().unwrap_or_default();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            self.request(&r.type_url.clone(), &names, Some(&r)).await;
            if done(&r) {
                return r;
            }
        }
    }
}

fn cluster_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| Cluster::decode(&a.value[..]).unwrap().name)
        .collect()
}

/// `(address, port, region/zone)` of every endpoint in a load assignment.
fn endpoints(r: &DiscoveryResponse, cluster: &str) -> Vec<(String, u32, String)> {
    let cla = r
        .resources
        .iter()
        .map(|a| ClusterLoadAssignment::decode(&a.value[..]).unwrap())
        .find(|c| c.cluster_name == cluster)
        .unwrap();
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        let l = locality.locality.clone().unwrap();
        for lb in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                panic!()
            };
            let Some(address::Address::SocketAddress(s)) = e.address.clone().unwrap().address
            else {
                panic!()
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else {
                panic!()
            };
            out.push((s.address, port, format!("{}/{}", l.region, l.zone)));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn clusters_and_endpoints_follow_service_entries_and_subsets() {
    let store = Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)));
    publish(&store, CONFIG).await;
    let stop = CancellationToken::new();
    let mcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mcp_addr = mcp.local_addr().unwrap();
    let source = SourceServer::new(
        store.clone(),
        IncrementalPolicy::All,
        McpMetrics::default(),
        stop.clone(),
    );
    tokio::spawn(
        mcp_proto::mcp::grpc_server()
            .add_service(source.into_service())
            .serve_with_incoming(mcp_proto::mcp::incoming(mcp)),
    );
    let xds = free();
    let args = pilot::PilotArgs {
        mcp_server: mcp_addr.to_string(),
        xds_addr: xds,
    };
    tokio::spawn(pilot::run(args, Admin::new("pilot"), stop.clone()));

    let mut proxy = Proxy::connect(xds).await;
    proxy.request(CLUSTER, &[], None).await;
    let all = "outbound|9080||reviews.shop.svc.cluster.local";
    let v1 = "outbound|9080|v1|reviews.shop.svc.cluster.local";
    let v2 = "outbound|9080|v2|reviews.shop.svc.cluster.local";
    let clusters = proxy
        .until(|r| r.type_url == CLUSTER && cluster_names(r).len() == 3)
        .await;
    assert_eq!(cluster_names(&clusters), [all, v1, v2]);

    proxy.request(ENDPOINT, &[all, v1, v2], None).await;
    let eds = proxy.until(|r| r.type_url == ENDPOINT).await;
    assert_eq!(
        endpoints(&eds, all),
        [
            ("10.0.0.1".to_string(), 19080, "us-east/zone-a".to_string()),
            ("10.0.0.2".to_string(), 9080, "us-east/zone-b".to_string())
        ]
    );
    assert_eq!(
        endpoints(&eds, v1),
        [("10.0.0.1".to_string(), 19080, "us-east/zone-a".to_string())]
    );
    assert_eq!(
        endpoints(&eds, v2),
        [("10.0.0.2".to_string(), 9080, "us-east/zone-b".to_string())]
    );

    // An endpoint change reaches the proxy as an EDS push; clusters are
    // not resent, since they did not change.
    publish(&store, &CONFIG.replace("10.0.0.2", "10.0.0.3")).await;
    let next = proxy.until(|_| true).await;
    assert_eq!(
        next.type_url, ENDPOINT,
        "an endpoint-only change is an EDS push"
    );
    assert_eq!(
        endpoints(&next, v2),
        [("10.0.0.3".to_string(), 9080, "us-east/zone-b".to_string())]
    );
    stop.cancel();
}
