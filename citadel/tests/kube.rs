//! Kubernetes mode against the fake API server (`testkit::fake_kube`: there is
//! no Kubernetes API server on these machines; it serves recorded-shape
//! lists, watch events the test pushes, object writes and token reviews
//! over real HTTP): TokenReview callers, a key-and-cert Secret per
//! ServiceAccount created, rotated and deleted, the root in a ConfigMap.

mod common;

use std::time::Duration;

use base64::Engine;
use citadel::kube::SECRET_TYPE;
use component::{Admin, CancellationToken};
use mesh_api::pb::istio::v1::auth::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use serde_json::{Value, json};
use testkit::fake_kube::FakeApi;
use tonic::{Code, Request};

const SECRETS: &str = "/api/v1/namespaces/bookinfo/secrets";

struct Mesh {
    api: FakeApi,
    citadel: std::net::SocketAddr,
    root: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Citadel in kube mode against a fake API server; returns once the root
/// is published.
async fn start(extra: &[&str]) -> Mesh {
    let (api, api_addr) = FakeApi::start().await;
    start_on(api, api_addr, extra).await
}

/// [`start`] against a fake API server already running, with a new
/// `--ca-dir`.
async fn start_on(api: FakeApi, api_addr: std::net::SocketAddr, extra: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApi::kubeconfig(api_addr)).unwrap();
    let (kubeconfig, ca_dir) = (
        kubeconfig.display().to_string(),
        dir.path().join("ca").display().to_string(),
    );
    let mut flags = vec![
        "--kube",
        "--kubeconfig",
        &kubeconfig,
        "--ca-dir",
        &ca_dir,
        "--grpc-hostname",
        "localhost",
        "--secret-check-interval",
        "100ms",
    ];
    flags.extend_from_slice(extra);
    let args = common::parse_args(&flags);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let citadel = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(citadel::run_on(
        listener,
        args,
        Admin::new("citadel"),
        stop.clone(),
    ));
    // The CA's own files, then the ConfigMap publishing the same root (a
    // restarted Citadel finds its predecessor's there already).
    let ca_root = dir.path().join("ca").join("root-cert.pem");
    let root = eventually(|| std::fs::read_to_string(&ca_root).ok()).await;
    eventually(|| {
        let published = api.object("/api/v1/namespaces/istio-system/configmaps/istio-security")?;
        (published["data"]["caTLSRootCert"] == root.as_str()).then_some(())
    })
    .await;
    Mesh {
        api,
        citadel,
        root,
        stop,
        _dir: dir,
    }
}

/// Polls `check` until it gives a value, for at most ten seconds.
async fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "not in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn service_account(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": "bookinfo", "resourceVersion": "4000"}})
}

#[tokio::test]
async fn every_service_account_gets_its_key_and_certificate_until_it_is_deleted() {
    let mesh = start(&["--dns-name", "bookinfo/ratings=ratings.bookinfo.svc"]).await;
    // The recorded accounts.
    for account in ["reviews", "ratings"] {
        let secret = eventually(|| mesh.api.object(&format!("{SECRETS}/istio.{account}"))).await;
        assert_eq!(secret["type"], SECRET_TYPE);
        assert_eq!(data(&secret, "root-cert.pem"), mesh.root);
        let chain = vec![data(&secret, "cert-chain.pem"), mesh.root.clone()];
        common::validate(&chain, &mesh.root);
        let (sans, left) = common::inspect(&chain[0]);
        let mut expected = vec![format!(
            "URI(spiffe://cluster.local/ns/bookinfo/sa/{account})"
        )];
        if account == "ratings" {
            // A webhook's name, as `--dns-name` asked.
            expected.push("DNSName(ratings.bookinfo.svc)".into());
        }
        assert_eq!(sans, expected);
        assert!(left > Duration::from_secs(23 * 3600), "{left:?}");
        // The key is the certificate's.
        let key = rcgen::KeyPair::from_pem(&data(&secret, "key.pem")).unwrap();
        assert!(common::holds_key(&chain[0], &key));
    }

    // A new account gets one; a deleted account's goes.
    let watch = "/api/v1/serviceaccounts";
    eventually(|| (mesh.api.open_watches(watch) > 0).then_some(())).await;
    mesh.api.push(
        watch,
        json!({"type": "ADDED", "object": service_account("details")}),
    );
    eventually(|| mesh.api.object(&format!("{SECRETS}/istio.details"))).await;
    mesh.api.push(
        watch,
        json!({"type": "DELETED", "object": service_account("ratings")}),
    );
    eventually(|| {
        mesh.api
            .object(&format!("{SECRETS}/istio.ratings"))
            .is_none()
            .then_some(())
    })
    .await;

    // Nothing was due for rotation.
    let replaced: Vec<_> = mesh
        .api
        .writes()
        .into_iter()
        .filter(|(verb, _)| verb == "replace")
        .collect();
    assert!(replaced.is_empty(), "{replaced:?}");
}

#[tokio::test]
async fn certificates_are_rotated_once_their_share_of_lifetime_has_passed() {
    let mesh = start(&["--workload-cert-ttl", "2s", "--secret-grace-ratio", "0.5"]).await;
    let path = format!("{SECRETS}/istio.reviews");
    let first = eventually(|| mesh.api.object(&path)).await;
    let rotated = eventually(|| {
        mesh.api
            .object(&path)
            .filter(|s| data(s, "cert-chain.pem") != data(&first, "cert-chain.pem"))
    })
    .await;
    assert!(mesh.api.writes().contains(&("replace".to_string(), path)));
    common::validate(
        &[data(&rotated, "cert-chain.pem"), mesh.root.clone()],
        &mesh.root,
    );
}

#[tokio::test]
async fn callers_authenticate_with_their_service_account_token() {
    let mesh = start(&[]).await;
    mesh.api
        .token("reviews-sa-token", "system:serviceaccount:bookinfo:reviews");
    mesh.api.token("admin-token", "kubernetes-admin");
    let channel = common::tls_channel(mesh.citadel, &mesh.root, None).await;
    let mut client = IstioCertificateServiceClient::new(channel);
    let (_, csr) = common::csr(None);
    let ask = |token: &str| {
        let mut request = Request::new(IstioCertificateRequest {
            csr: csr.clone(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let chain = client
        .create_certificate(ask("reviews-sa-token"))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        common::inspect(&chain[0]).0,
        ["URI(spiffe://cluster.local/ns/bookinfo/sa/reviews)"]
    );
    let refused = client.create_certificate(ask("forged")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("not accepted"),
        "{}",
        refused.message()
    );
    let not_a_workload = client
        .create_certificate(ask("admin-token"))
        .await
        .unwrap_err();
    assert_eq!(not_a_workload.code(), Code::Unauthenticated);
    assert!(not_a_workload.message().contains("not a service account"));
}

#[tokio::test]
async fn the_ca_survives_a_restart_in_its_secret() {
    let (api, api_addr) = FakeApi::start().await;
    let first = start_on(api.clone(), api_addr, &[]).await;
    let saved =
        eventually(|| api.object("/api/v1/namespaces/istio-system/secrets/istio-ca-secret")).await;
    assert_eq!(data(&saved, "root-cert.pem"), first.root);
    first.stop.cancel();
    // A new pod: its --ca-dir is empty, and the root is the same.
    let second = start_on(api.clone(), api_addr, &[]).await;
    assert_eq!(second.root, first.root);
    let creates = api
        .writes()
        .iter()
        .filter(|(verb, path)| verb == "create" && path.ends_with("/istio-ca-secret"))
        .count();
    assert_eq!(creates, 1);
}
