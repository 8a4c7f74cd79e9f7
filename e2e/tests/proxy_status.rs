//! `meshctl proxy-status` against the `pilot` binary, with a proxy played
//! by a tonic ADS client: what it ACKed is SYNCED, what it has not is
//! STALE, what it never asked for is NOT SENT.

use std::time::Duration;

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use testkit::*;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use mesh_api::xds::{CLUSTER as CDS, ENDPOINT as EDS};
const NODE: &str = "sidecar~10.0.0.7~ratings-v1.shop~shop.svc.cluster.local";

fn request(type_url: &str, answering: Option<(&str, &str)>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: NODE.into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        version_info: answering.map(|(v, _)| v.to_string()).unwrap_or_default(),
        response_nonce: answering.map(|(_, n)| n.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

#[tokio::test]
async fn proxy_status_shows_what_each_proxy_took() {
    // Galley with no config: Pilot serves an empty model.
    let dir = config_dir(&[]);
    let galley = Galley::start(dir.path(), &[]).await;
    let xds = free_addr();
    let (mut pilot, admin) = testkit::start_pilot(galley.mcp, xds, &[]);
    pilot.ready(admin).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), responses.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };

    tx.send(request(CDS, None)).await.unwrap();
    let clusters = next().await;
    tx.send(request(
        CDS,
        Some((&clusters.version_info, &clusters.nonce)),
    ))
    .await
    .unwrap();
    tx.send(request(EDS, None)).await.unwrap();
    next().await; // endpoints, not ACKed

    let mut status = Proc::start("meshctl", &["proxy-status", "--pilot", &admin.to_string()]);
    let lines = status.stdout_until(NODE).await;
    assert!(status.exit().await.success());
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["NAME", "CDS", "LDS", "EDS", "RDS"]);
    let row = lines.last().unwrap();
    let columns: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns,
        [NODE, "SYNCED", "NOT SENT", "STALE", "NOT SENT"],
        "{row}"
    );
    assert!(pilot.terminate().await.success());
}
