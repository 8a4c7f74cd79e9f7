//! ADS over mutual TLS (15011): a proxy with a certificate from the mesh
//! root is served; one without a certificate, or with one from another
//! root, is refused in the handshake.

mod support;

use std::{net::SocketAddr, path::Path, time::Duration};

use envoy_types::pb::envoy::{
    config::{cluster::v3::Cluster, core::v3::Node},
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use pilot::xds::CLUSTER;
use rcgen::{CertificateParams, IsCa, KeyPair, SanType};
use support::{ControlPlane, decode};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A leaf for `sans` signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, sans: Vec<SanType>) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn spiffe(id: &str) -> SanType {
    SanType::URI(id.try_into().unwrap())
}

async fn clusters(addr: SocketAddr, tls: ClientTlsConfig) -> Result<Vec<Cluster>, String> {
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let request = DiscoveryRequest {
        node: Some(Node {
            id: "sidecar~10.0.0.9~app.web~web.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: CLUSTER.into(),
        ..Default::default()
    };
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(tokio_stream::iter([request]).chain(tokio_stream::pending()))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let response = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .map_err(|_| "no response".to_string())?
        .ok_or("stream closed")?
        .map_err(|e| e.to_string())?;
    Ok(decode(&response))
}

fn write(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test]
async fn ads_over_mtls_serves_mesh_certificates_only() {
    let mesh = ca("mesh root");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = leaf(
        &mesh,
        vec![
            SanType::DnsName("istio-pilot.istio-system".try_into().unwrap()),
            spiffe("spiffe://cluster.local/ns/istio-system/sa/istio-pilot-service-account"),
        ],
    );
    let tls_addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cert_path = write(dir.path(), "cert-chain.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let root_path = write(dir.path(), "root-cert.pem", &mesh.cert.pem());
    let config = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
";
    let _cp = ControlPlane::start_with(config, |args| {
        args.xds_tls_addr = tls_addr;
        args.tls_cert = Some(cert_path);
        args.tls_key = Some(key_path);
        args.tls_root = Some(root_path);
    })
    .await;

    let root = Certificate::from_pem(mesh.cert.pem());
    let server_name = "istio-pilot.istio-system";
    let (proxy_cert, proxy_key) = leaf(&mesh, vec![spiffe("spiffe://cluster.local/ns/web/sa/app")]);
    let mesh_proxy = ClientTlsConfig::new()
        .ca_certificate(root.clone())
        .domain_name(server_name)
        .identity(Identity::from_pem(&proxy_cert, &proxy_key));
    // The port may still be binding: retry the first connection briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let served = loop {
        match clusters(tls_addr, mesh_proxy.clone()).await {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("a mesh proxy is served: {e}"),
        }
    };
    assert!(
        served
            .iter()
            .any(|c| c.name == "outbound|9080||reviews.shop.svc.cluster.local")
    );

    let anonymous = ClientTlsConfig::new()
        .ca_certificate(root.clone())
        .domain_name(server_name);
    assert!(
        clusters(tls_addr, anonymous).await.is_err(),
        "no client certificate, no config"
    );

    let other = ca("another root");
    let (stranger_cert, stranger_key) =
        leaf(&other, vec![spiffe("spiffe://evil.example/ns/x/sa/y")]);
    let stranger = ClientTlsConfig::new()
        .ca_certificate(root)
        .domain_name(server_name)
        .identity(Identity::from_pem(&stranger_cert, &stranger_key));
    assert!(
        clusters(tls_addr, stranger).await.is_err(),
        "a certificate from another root is refused"
    );
}
