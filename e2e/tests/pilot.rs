//! The `pilot` binary following the `galley` binary: proxies (tonic ADS
//! clients) keep being served, and new ones can connect, while Galley is
//! killed; Pilot catches up when Galley returns; the debug pages show the
//! model.

use std::time::Duration;

use envoy_types::pb::envoy::{
    config::{cluster::v3::Cluster, core::v3::Node},
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use prost::Message;
use testkit::*;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use mesh_api::xds::CLUSTER as CDS;

const REVIEWS: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.1.2.3, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews}}], timeout: 2s}]
";

const RATINGS: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.1.2.4}]
";

/// A proxy subscribed to every cluster, ACKing what it receives.
struct Proxy {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

fn request(answering: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "sidecar~10.9.9.9~productpage-1.shop~shop.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        version_info: answering
            .map(|r| r.version_info.clone())
            .unwrap_or_default(),
        response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

impl Proxy {
    async fn connect(xds: std::net::SocketAddr) -> Self {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(8);
        let responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        requests.send(request(None)).await.unwrap();
        Self {
            requests,
            responses,
        }
    }

    /// Cluster names of responses until they include `name`.
    async fn until_cluster(&mut self, name: &str) -> Vec<String> {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(20), self.responses.next())
                .await
                .expect("a response in time")
                .unwrap()
                .unwrap();
            self.requests.send(request(Some(&r))).await.unwrap();
            let names: Vec<String> = r
                .resources
                .iter()
                .map(|a| Cluster::decode(&a.value[..]).unwrap().name)
                .collect();
            if names.iter().any(|n| n == name) {
                return names;
            }
        }
    }
}

#[tokio::test]
async fn pilot_serves_while_galley_is_down_and_catches_up() {
    let dir = config_dir(&[("reviews.yaml", REVIEWS)]);
    let galley = Galley::start(dir.path(), &[]).await;
    let mcp = galley.mcp;
    let xds = free_addr();
    let (mut pilot, admin) = testkit::start_pilot(mcp, xds, &[]);
    pilot.ready(admin).await;
    let reviews = "outbound|9080||reviews.shop.svc.cluster.local";
    let ratings = "outbound|9080||ratings.shop.svc.cluster.local";
    let mut first = Proxy::connect(xds).await;
    first.until_cluster(reviews).await;

    // The debug pages show the model Pilot built.
    let (_, configz) = get(admin, "/debug/configz").await.unwrap();
    let configz: serde_json::Value = serde_json::from_str(&configz).unwrap();
    assert_eq!(
        configz["virtual_services"][0]["spec"]["hosts"][0],
        "reviews.shop.svc.cluster.local"
    );
    let (_, endpointz) = get(admin, "/debug/endpointz").await.unwrap();
    let endpointz: serde_json::Value = serde_json::from_str(&endpointz).unwrap();
    assert_eq!(
        endpointz["reviews.shop.svc.cluster.local"][0]["address"],
        "10.1.2.3"
    );

    // Galley dies: the connected proxy keeps its stream, and a new proxy
    // still gets the last good config.
    galley.proc.kill().await;
    let mut second = Proxy::connect(xds).await;
    second.until_cluster(reviews).await;

    // Galley returns, on the same address, with more config: Pilot
    // reconnects and both proxies get it.
    std::fs::write(dir.path().join("ratings.yaml"), RATINGS).unwrap();
    let galley = Galley::start_at(dir.path(), mcp, &[]).await;
    for proxy in [&mut first, &mut second] {
        let names = proxy.until_cluster(ratings).await;
        assert!(names.iter().any(|n| n == reviews));
    }
    assert!(pilot.terminate().await.success());
    assert!(galley.proc.terminate().await.success());
}

#[tokio::test]
async fn proxies_that_connect_before_pilot_has_a_model_wait_for_a_whole_one() {
    let dir = config_dir(&[("reviews.yaml", REVIEWS)]);
    let mcp = free_addr();
    let xds = free_addr();
    let (_pilot, admin) = testkit::start_pilot(mcp, xds, &[]);
    // Pilot is up, without Galley: a proxy connecting now is not answered
    // until Galley has been heard from.
    wait_for_http(admin, "/ready", |s, _| s == 503).await;
    let early = tokio::spawn(async move {
        let mut proxy = Proxy::connect(xds).await;
        let first = tokio::time::timeout(Duration::from_secs(20), proxy.responses.next())
            .await
            .expect("a response once Galley is up")
            .unwrap()
            .unwrap();
        first
            .resources
            .iter()
            .map(|a| Cluster::decode(&a.value[..]).unwrap().name)
            .collect::<Vec<_>>()
    });
    let _galley = Galley::start_at(dir.path(), mcp, &[]).await;
    // Its first answer is the whole config, not an empty one.
    let names = early.await.unwrap();
    assert!(
        names
            .iter()
            .any(|n| n == "outbound|9080||reviews.shop.svc.cluster.local"),
        "{names:?}"
    );
}
