//! `meshctl proxy-status` against the `pilot` binary, with proxies played
//! by tonic ADS clients: what one ACKed is SYNCED, what it has not is
//! STALE, what it never asked for is NOT SENT; each row names its Pilot
//! (two replicas here, each with a proxy of its own) and the proxy's
//! version, from Istio's node metadata or the xDS user agent.

use std::{net::SocketAddr, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{BuildVersion, Node, node::UserAgentVersionType},
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
        r#type::v3::SemanticVersion,
    },
    google::protobuf::{Struct, Value, value::Kind},
};
use testkit::*;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

use mesh_api::xds::{CLUSTER as CDS, ENDPOINT as EDS};
/// An Envoy, saying its version in the user agent.
const ENVOY: &str = "sidecar~10.0.0.7~ratings-v1.shop~shop.svc.cluster.local";
/// An Istio sidecar, whose agent says the version in the node metadata.
const ISTIO: &str = "sidecar~10.0.0.8~reviews-v1.shop~shop.svc.cluster.local";

fn node(id: &str) -> Node {
    match id {
        ENVOY => Node {
            id: id.into(),
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 28,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        },
        _ => Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: [(
                    mesh_api::xds::metadata::PROXY_VERSION.to_string(),
                    Value {
                        kind: Some(Kind::StringValue("1.1.17".into())),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        },
    }
}

fn request(id: &str, type_url: &str, answering: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node(id)),
        type_url: type_url.into(),
        version_info: answering
            .map(|r| r.version_info.clone())
            .unwrap_or_default(),
        response_nonce: answering.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

/// A proxy `id` on the Pilot at `xds` that ACKs its clusters and leaves
/// its endpoints unanswered; its stream, held open.
async fn proxy(xds: SocketAddr, id: &str) -> mpsc::Sender<DiscoveryRequest> {
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
    tx.send(request(id, CDS, None)).await.unwrap();
    let clusters = next().await;
    tx.send(request(id, CDS, Some(&clusters))).await.unwrap();
    tx.send(request(id, EDS, None)).await.unwrap();
    next().await; // endpoints, not ACKed
    tokio::spawn(async move { while responses.next().await.is_some() {} });
    tx
}

/// `meshctl proxy-status` with `args`: its rows, each split into columns.
async fn proxy_status(args: &[&str]) -> Vec<Vec<String>> {
    let args: Vec<String> = ["proxy-status"]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect();
    let out = tokio::task::spawn_blocking(move || run_ok("meshctl", &args))
        .await
        .unwrap();
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "CDS", "LDS", "EDS", "RDS", "PILOT", "VERSION"]
    );
    lines
        .map(|row| {
            row.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn proxy_status_shows_what_each_proxy_took_on_every_pilot() {
    // Galley with no config: each Pilot serves an empty model.
    let dir = config_dir(&[]);
    let galley = Galley::start(dir.path(), &[]).await;
    let mut pilots = Vec::new();
    for _ in 0..2 {
        let xds = free_addr();
        let (mut pilot, admin) = testkit::start_pilot(galley.mcp, xds, &[]);
        pilot.ready(admin).await;
        pilots.push((pilot, admin.to_string(), xds));
    }
    let _envoy = proxy(pilots[0].2, ENVOY).await;
    let _istio = proxy(pilots[1].2, ISTIO).await;
    let (a, b) = (pilots[0].1.as_str(), pilots[1].1.as_str());

    let rows = proxy_status(&["--pilot", a, "--pilot", b]).await;
    assert_eq!(
        rows,
        [
            [
                ENVOY,
                "SYNCED",
                "NOT SENT",
                "STALE",
                "NOT SENT",
                a,
                "envoy/1.28.0"
            ],
            [
                ISTIO, "SYNCED", "NOT SENT", "STALE", "NOT SENT", b, "1.1.17"
            ],
        ]
    );
    // One proxy, by part of its name.
    let rows = proxy_status(&["reviews", "--pilot", a, "--pilot", b]).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], ISTIO);
    for (pilot, ..) in pilots {
        assert!(pilot.terminate().await.success());
    }
}
