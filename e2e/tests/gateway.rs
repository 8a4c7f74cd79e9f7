//! The `proxy` binary as an ingress gateway (`--type router`), configured
//! by the real `pilot` from a `Gateway` and the `VirtualService`s bound to
//! it, on the real `galley`: plain HTTP, HTTPS terminated with the
//! certificate the client's server name asks for, `httpsRedirect`, and TLS
//! passed through by server name to a backend whose own certificate the
//! client checks.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use testkit::*;

/// A self-signed certificate for `host`, written as `<host>.crt` and
/// `<host>.key` in `dir`; and its key.
fn certificate(dir: &Path, host: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{host}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{host}.key")), key.serialize_pem()).unwrap();
    (cert, key)
}

struct Ports {
    http: SocketAddr,
    https: SocketAddr,
    mutual: SocketAddr,
    passthrough: SocketAddr,
    app: SocketAddr,
    backend: SocketAddr,
}

fn config(p: &Ports, certs: &Path) -> String {
    let cert = |host: &str| certs.join(host).display().to_string();
    let (a, b, m) = (cert("a.example"), cert("b.example"), cert("m.example"));
    let clients = cert("clients-ca.pem");
    format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {http}, name: http-plain, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: [plain.example]
  - port: {{number: {http}, name: http-secure, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: [secure.example]
    tls: {{httpsRedirect: true}}
  - port: {{number: {https}, name: https-a, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [a.example]
    tls: {{mode: SIMPLE, serverCertificate: {a}.crt, privateKey: {a}.key}}
  - port: {{number: {https}, name: https-b, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [b.example]
    tls: {{mode: SIMPLE, serverCertificate: {b}.crt, privateKey: {b}.key}}
  - port: {{number: {mutual}, name: https-m, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [m.example]
    tls: {{mode: MUTUAL, serverCertificate: {m}.crt, privateKey: {m}.key, caCertificates: {clients}}}
  - port: {{number: {passthrough}, name: tls, protocol: TLS}}
    bind: 127.0.0.1
    hosts: [tls.example]
    tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [plain.example, secure.example, a.example, b.example, m.example]
  gateways: [ingress]
  http:
  - route:
    - destination: {{host: app.shop.svc.cluster.local, port: {{number: 8080}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: tls, namespace: shop}}
spec:
  hosts: [tls.example]
  gateways: [ingress]
  tls:
  - match: [{{port: {passthrough}, sniHosts: [tls.example]}}]
    route:
    - destination: {{host: tls.example, port: {{number: 443}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: app, namespace: shop}}
spec:
  hosts: [app.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app_port}}}, labels: {{app: web}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: tls-backend, namespace: shop}}
spec:
  hosts: [tls.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {backend_port}}}}}]
",
        http = p.http.port(),
        https = p.https.port(),
        mutual = p.mutual.port(),
        passthrough = p.passthrough.port(),
        app_port = p.app.port(),
        backend_port = p.backend.port(),
    )
}

/// A client that trusts `certs`, presents `identity` when given, and finds
/// every host at the gateway, a new connection for each request.
fn client(
    certs: &[&rcgen::Certificate],
    hosts: &[(&str, SocketAddr)],
    identity: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
) -> reqwest::Client {
    install_crypto();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert.der().clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let tls = match identity {
        Some((cert, key)) => {
            let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into();
            builder
                .with_client_auth_cert(vec![cert.der().clone()], key)
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5));
    for (host, addr) in hosts {
        builder = builder.resolve(host, *addr);
    }
    builder.build().unwrap()
}

/// A CA of clients, written as `clients-ca.pem` in `dir`, and a client
/// certificate it signed.
fn client_ca(dir: &Path) -> (rcgen::Certificate, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("clients-ca.pem"), ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["client.example".to_string()]).unwrap();
    (params.signed_by(&key, &issuer).unwrap(), key)
}

/// GETs `url` until the gateway serves it (its config arrives from Pilot
/// after it starts), then returns the status and body; fails the test
/// with the gateway's log and config when it never does.
async fn get_when_served(
    client: &reqwest::Client,
    url: &str,
    gateway: &mut (Proc, SocketAddr),
) -> (u16, String) {
    for _ in 0..100 {
        if let Ok(response) = client.get(url).send().await
            && response.status() != 404
        {
            let status = response.status().as_u16();
            return (status, response.text().await.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config = get(gateway.1, "/config_dump").await;
    let log = gateway.0.stderr_so_far().await;
    panic!("{url} was never served; gateway log: {log:#?}; config: {config:?}");
}

/// The `client` workload's Sidecar: its outbound traffic through `port`
/// on loopback, as `protocol` (HTTP: the app's `HTTP_PROXY`).
fn client_sidecar(port: u16, protocol: &str) -> String {
    let name = protocol.to_ascii_lowercase();
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: client, namespace: shop}}
spec:
  workloadSelector: {{labels: {{app: client}}}}
  egress:
  - port: {{number: {port}, protocol: {protocol}, name: {name}}}
    bind: 127.0.0.1
    hosts: [./*]
---
"
    )
}

/// The ingress gateway (the proxy as a router, labelled as Istio's) on
/// Pilot at `xds`, with `args`, ready; and its admin address.
async fn ingress_gateway(xds: SocketAddr, args: &[&str]) -> (Proc, SocketAddr) {
    let mut all = vec![
        "--type",
        "router",
        "--pod",
        "istio-ingressgateway-1",
        "--labels",
        "istio=ingressgateway",
    ];
    all.extend_from_slice(args);
    local_proxy(xds, &all).await
}

#[tokio::test]
async fn an_ingress_gateway_serves_http_https_by_server_name_redirects_and_passthrough() {
    let certs = tempfile::tempdir().unwrap();
    let (a, _) = certificate(certs.path(), "a.example");
    let (b, _) = certificate(certs.path(), "b.example");
    let (m, _) = certificate(certs.path(), "m.example");
    let member = client_ca(certs.path());
    let (backend, backend_ca) = tls_server(&["tls.example"], "passed through");
    let ports = Ports {
        http: free_addr(),
        https: free_addr(),
        mutual: free_addr(),
        passthrough: free_addr(),
        app: http_app("app").await,
        backend,
    };
    let dir = config_dir(&[("gateway.yaml", &config(&ports, certs.path()))]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let mut gateway = ingress_gateway(xds, &[]).await;

    let hosts = [
        ("plain.example", ports.http),
        ("secure.example", ports.http),
        ("a.example", ports.https),
        ("b.example", ports.https),
        ("m.example", ports.mutual),
    ];
    let web = client(&[&a, &b, &m], &hosts, None);
    let http = ports.http.port();
    let (status, body) =
        get_when_served(&web, &format!("http://plain.example:{http}/"), &mut gateway).await;
    assert_eq!((status, body.as_str()), (200, "app"));

    // Each host's own certificate, chosen by the server name: the client
    // checks it against the host it asked for.
    let https = ports.https.port();
    for host in ["a.example", "b.example"] {
        let (status, body) =
            get_when_served(&web, &format!("https://{host}:{https}/"), &mut gateway).await;
        assert_eq!((status, body.as_str()), (200, "app"), "{host}");
    }
    let only_a = client(&[&a], &hosts, None);
    let wrong = only_a
        .get(format!("https://b.example:{https}/"))
        .send()
        .await;
    assert!(wrong.is_err(), "b.example's certificate is not a's");

    // MUTUAL: only a client with a certificate from the Gateway's CA.
    let url = format!("https://m.example:{}/", ports.mutual.port());
    let with_certificate = client(&[&m], &hosts, Some(&member));
    let (status, body) = get_when_served(&with_certificate, &url, &mut gateway).await;
    assert_eq!((status, body.as_str()), (200, "app"));
    assert!(web.get(&url).send().await.is_err(), "no client certificate");
    let stranger = client_ca(tempfile::tempdir().unwrap().path());
    let outsider = client(&[&m], &hosts, Some(&stranger));
    assert!(
        outsider.get(&url).send().await.is_err(),
        "another CA's client"
    );

    let redirect = web
        .get(format!("http://secure.example:{http}/cart?id=7"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), 301);
    let location = redirect.headers()["location"].to_str().unwrap();
    assert_eq!(location, format!("https://secure.example:{http}/cart?id=7"));

    // Passed through by server name, never decrypted: the client checks
    // the backend's own certificate.
    let ca = reqwest::Certificate::from_pem(backend_ca.as_bytes()).unwrap();
    let through = reqwest::Client::builder()
        .tls_certs_only([ca])
        .resolve("tls.example", ports.passthrough)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("https://tls.example:{}/", ports.passthrough.port());
    let (status, body) = get_when_served(&through, &url, &mut gateway).await;
    assert_eq!((status, body.as_str()), (200, "passed through"));
}

#[tokio::test]
async fn a_sidecar_originates_tls_to_a_server_outside_the_mesh() {
    let (server, ca) = tls_server(&["api.example.com"], "from outside");
    let (_, other_ca) = tls_server(&["api.example.com"], "never");
    let cas = tempfile::tempdir().unwrap();
    std::fs::write(cas.path().join("ca.pem"), ca).unwrap();
    std::fs::write(cas.path().join("other-ca.pem"), other_ca).unwrap();
    let egress = free_addr();
    let config = format!(
        "
{client}apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com, impostor.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  # Labelled, so that the sidecar at 127.0.0.1 does not take it for its
  # own workload.
  endpoints: [{{address: 127.0.0.1, ports: {{http: {server_port}}}, labels: {{app: api}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: api, namespace: shop}}
spec:
  host: api.example.com
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: impostor, namespace: shop}}
spec:
  host: impostor.example.com
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {other_ca}}}}}
",
        client = client_sidecar(egress.port(), "HTTP"),
        server_port = server.port(),
        ca = cas.path().join("ca.pem").display(),
        other_ca = cas.path().join("other-ca.pem").display(),
    );
    let dir = config_dir(&[("origination.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let mut sidecar = local_proxy(xds, &["--pod", "client-1", "--labels", "app=client"]).await;
    install_crypto();
    let app = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{egress}")).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Plain HTTP from the app; TLS from its sidecar, which checks the
    // server against the DestinationRule's CA and the name it sent by SNI.
    let (status, body) = get_when_served(&app, "http://api.example.com/", &mut sidecar).await;
    assert_eq!((status, body.as_str()), (200, "from outside"));
    // The same server under another name, checked against another CA: the
    // sidecar refuses it.
    let refused = app
        .get("http://impostor.example.com/")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let why = refused.text().await.unwrap();
    assert!(why.contains("upstream connect error"), "{why}");
}

#[tokio::test]
async fn a_rotated_gateway_certificate_is_served_without_a_failed_request() {
    // As a Secret is mounted: the files behind a link that is swapped at
    // once for a new directory.
    let certs = tempfile::tempdir().unwrap();
    let version = |v: &str| {
        let dir = certs.path().join(v);
        std::fs::create_dir(&dir).unwrap();
        certificate(&dir, "a.example").0
    };
    let old = version("v1");
    std::os::unix::fs::symlink("v1", certs.path().join("live")).unwrap();
    let (https, app) = (free_addr(), http_app("app").await);
    let live = certs.path().join("live").join("a.example");
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {https}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [a.example]
    tls: {{mode: SIMPLE, serverCertificate: {live}.crt, privateKey: {live}.key}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [a.example]
  gateways: [ingress]
  http:
  - route:
    - destination: {{host: app.shop.svc.cluster.local, port: {{number: 8080}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: app, namespace: shop}}
spec:
  hosts: [app.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app_port}}}, labels: {{app: web}}}}]
",
        https = https.port(),
        live = live.display(),
        app_port = app.port(),
    );
    let dir = config_dir(&[("gateway.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let mut gateway = ingress_gateway(xds, &[]).await;
    let url = format!("https://a.example:{}/", https.port());
    let hosts = [("a.example", https)];
    let old_only = client(&[&old], &hosts, None);
    get_when_served(&old_only, &url, &mut gateway).await;

    let new = version("v2");
    let either = client(&[&old, &new], &hosts, None);
    // New connections throughout, from before the rotation to after it.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (sent, stop, url) = (sent.clone(), stop.clone(), url.clone());
        async move {
            let mut failed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match either.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    other => failed.push(format!("{other:?}")),
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            failed
        }
    });
    let sent_at_least = |n: usize| {
        let sent = sent.clone();
        async move {
            while sent.load(std::sync::atomic::Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    sent_at_least(10).await;
    // Rotated as Kubernetes updates a mounted Secret: one rename.
    std::os::unix::fs::symlink("v2", certs.path().join("live.next")).unwrap();
    std::fs::rename(certs.path().join("live.next"), certs.path().join("live")).unwrap();
    let new_only = client(&[&new], &hosts, None);
    let mut served = false;
    for _ in 0..100 {
        if new_only
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rotated_at = sent.load(std::sync::atomic::Ordering::Relaxed);
    sent_at_least(rotated_at + 10).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = load.await.unwrap();
    assert!(served, "the new certificate was never served");
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(
        old_only.get(&url).send().await.is_err(),
        "the old one is gone"
    );
}

/// A `kubernetes.io/tls` Secret of namespace `shop` as a watch event.
fn secret_event(
    kind: &str,
    name: &str,
    version: u32,
    cert: &rcgen::Certificate,
    key: &rcgen::KeyPair,
) -> serde_json::Value {
    use base64::Engine;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    serde_json::json!({"type": kind, "object": {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": version.to_string()},
        "data": {"tls.crt": b64(cert.pem()), "tls.key": b64(key.serialize_pem())},
    }})
}

#[tokio::test]
async fn credentials_by_name_come_from_a_mounted_directory_or_the_namespaces_secrets() {
    let mounted = tempfile::tempdir().unwrap();
    let credential = mounted.path().join("d-credential");
    std::fs::create_dir(&credential).unwrap();
    let (d, d_key) = certificate(&credential, "d.example");
    std::fs::rename(credential.join("d.example.crt"), credential.join("tls.crt")).unwrap();
    std::fs::write(credential.join("tls.key"), d_key.serialize_pem()).unwrap();
    std::fs::remove_file(credential.join("d.example.key")).unwrap();

    let (api, api_addr) = testkit::fake_kube::FakeApi::start().await;
    let kubeconfig = mounted.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        testkit::fake_kube::FakeApi::kubeconfig(api_addr),
    )
    .unwrap();

    let (https, app) = (free_addr(), http_app("app").await);
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {https}, name: https-d, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [d.example]
    tls: {{mode: SIMPLE, credentialName: d-credential}}
  - port: {{number: {https}, name: https-k, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [k.example]
    tls: {{mode: SIMPLE, credentialName: k-credential}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [d.example, k.example]
  gateways: [ingress]
  http:
  - route:
    - destination: {{host: app.shop.svc.cluster.local, port: {{number: 8080}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: app, namespace: shop}}
spec:
  hosts: [app.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app_port}}}, labels: {{app: web}}}}]
",
        https = https.port(),
        app_port = app.port(),
    );
    let dir = config_dir(&[("gateway.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let (mounted_dir, kubeconfig) = (
        mounted.path().display().to_string(),
        kubeconfig.display().to_string(),
    );
    let mut gateway = ingress_gateway(
        xds,
        &[
            "--credentials-dir",
            &mounted_dir,
            "--credentials-from-secrets",
            "--kubeconfig",
            &kubeconfig,
        ],
    )
    .await;
    let hosts = [("d.example", https), ("k.example", https)];
    let from_dir = client(&[&d], &hosts, None);
    let url = |host: &str| format!("https://{host}:{}/", https.port());
    let (status, _) = get_when_served(&from_dir, &url("d.example"), &mut gateway).await;
    assert_eq!(status, 200);
    // What the gateway presents, as `meshctl proxy-config secret` reads
    // it: the mounted credential, and the Secret not there yet.
    let credentials = |dump: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(dump).unwrap()["gateway_credentials"].clone()
    };
    let (_, dump) = get(gateway.1, "/config_dump").await.unwrap();
    let held = credentials(&dump);
    assert_eq!(held[0]["name"], "d-credential", "{held}");
    assert!(held[0]["not_after"].is_string(), "{held}");
    assert_eq!(held[1]["name"], "k-credential", "{held}");
    assert!(
        held[1]["error"].as_str().unwrap().contains("no credential"),
        "{held}"
    );

    let secrets = "/api/v1/namespaces/shop/secrets";
    for _ in 0..100 {
        if api.open_watches(secrets) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kdir = tempfile::tempdir().unwrap();
    let (k1, k1_key) = certificate(kdir.path(), "k.example");
    api.push(
        secrets,
        secret_event("ADDED", "k-credential", 4002, &k1, &k1_key),
    );
    let from_secret = client(&[&k1], &hosts, None);
    let (status, _) = get_when_served(&from_secret, &url("k.example"), &mut gateway).await;
    assert_eq!(status, 200);
    let (_, dump) = get(gateway.1, "/config_dump").await.unwrap();
    let held = credentials(&dump);
    assert!(held[1]["serial_number"].is_string(), "{held}");

    // The Secret rotated: the next handshake serves the new certificate.
    let (k2, k2_key) = certificate(kdir.path(), "k.example");
    api.push(
        secrets,
        secret_event("MODIFIED", "k-credential", 4003, &k2, &k2_key),
    );
    let rotated = client(&[&k2], &hosts, None);
    let (status, _) = get_when_served(&rotated, &url("k.example"), &mut gateway).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_sidecar_routes_tls_by_server_name_without_decrypting_it() {
    let names = ["a.tls.example", "b.tls.example"];
    let (a, a_ca) = tls_server(&names, "backend a");
    let (b, b_ca) = tls_server(&names, "backend b");
    let egress = free_addr();
    // SNI a goes to backend b and b to a: the route decides, not the name.
    let config = format!(
        "
{client}apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: a, namespace: shop}}
spec:
  hosts: [a.tls.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {a_port}}}, labels: {{app: a}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: b, namespace: shop}}
spec:
  hosts: [b.tls.example]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {b_port}}}, labels: {{app: b}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: crossed, namespace: shop}}
spec:
  hosts: [a.tls.example, b.tls.example]
  tls:
  - match: [{{port: {port}, sniHosts: [a.tls.example]}}]
    route: [{{destination: {{host: b.tls.example, port: {{number: {port}}}}}}}]
  - match: [{{port: {port}, sniHosts: [b.tls.example]}}]
    route: [{{destination: {{host: a.tls.example, port: {{number: {port}}}}}}}]
",
        port = egress.port(),
        client = client_sidecar(egress.port(), "TLS"),
        a_port = a.port(),
        b_port = b.port(),
    );
    let dir = config_dir(&[("tls-routes.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let mut sidecar = local_proxy(xds, &["--pod", "client-1", "--labels", "app=client"]).await;
    install_crypto();
    let cas = [a_ca, b_ca].map(|pem| reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    let app = reqwest::Client::builder()
        .tls_certs_only(cas)
        .resolve("a.tls.example", egress)
        .resolve("b.tls.example", egress)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let port = egress.port();
    for (host, reached) in [
        ("a.tls.example", "backend b"),
        ("b.tls.example", "backend a"),
    ] {
        let url = format!("https://{host}:{port}/");
        let (status, body) = get_when_served(&app, &url, &mut sidecar).await;
        assert_eq!((status, body.as_str()), (200, reached), "{host}");
    }
}

#[tokio::test]
async fn an_egress_gateway_originates_tls_for_the_mesh() {
    // Istio 1.1's "egress gateway with TLS origination": the app speaks
    // plain HTTP; its sidecar sends it to the egress gateway over mesh
    // mTLS; the gateway originates TLS to the server outside the mesh.
    let (server, server_ca) = tls_server(&["api.example.com"], "from outside");
    let dir = tempfile::tempdir().unwrap();
    let citadel =
        Citadel::start(dir.path(), &[("shop", "client"), ("shop", "egressgateway")]).await;
    std::fs::write(dir.path().join("api-ca.pem"), server_ca).unwrap();
    let gateway_certs = dir.path().join("egressgateway-certs");
    let (egress, gateway_port) = (free_addr(), free_addr().port());
    let certs = gateway_certs.display();
    let config = format!(
        "
{client}apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 443, name: https, protocol: HTTPS}}
  endpoints: [{{address: 127.0.0.1, ports: {{http: {server_port}, https: {server_port}}}, labels: {{app: api}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: egressgateway, namespace: shop}}
spec:
  hosts: [istio-egressgateway.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {gateway_port}, name: https, protocol: HTTPS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{https: {gateway_port}}}, labels: {{istio: egressgateway}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: egress, namespace: shop}}
spec:
  selector: {{istio: egressgateway}}
  servers:
  - port: {{number: {gateway_port}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: [api.example.com]
    tls:
      mode: MUTUAL
      serverCertificate: {certs}/cert-chain.pem
      privateKey: {certs}/key.pem
      caCertificates: {certs}/root-cert.pem
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: egressgateway-for-api, namespace: shop}}
spec:
  host: istio-egressgateway.shop.svc.cluster.local
  subsets:
  - name: api
    trafficPolicy:
      portLevelSettings:
      - port: {{number: {gateway_port}}}
        tls: {{mode: ISTIO_MUTUAL, sni: api.example.com}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: api-through-egress, namespace: shop}}
spec:
  hosts: [api.example.com]
  gateways: [egress, mesh]
  http:
  - match: [{{gateways: [mesh]}}]
    route:
    - destination: {{host: istio-egressgateway.shop.svc.cluster.local, subset: api, port: {{number: {gateway_port}}}}}
  - match: [{{gateways: [egress]}}]
    route:
    - destination: {{host: api.example.com, port: {{number: 443}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: originate-tls, namespace: shop}}
spec:
  host: api.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 443}}
      tls: {{mode: SIMPLE, caCertificates: {ca}}}
",
        client = client_sidecar(egress.port(), "HTTP"),
        server_port = server.port(),
        ca = dir.path().join("api-ca.pem").display(),
    );
    let config_files = config_dir(&[("egress.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(config_files.path(), &[]).await;
    let citadel_args = |account: &str| {
        [
            "--citadel".to_string(),
            citadel.addr.to_string(),
            "--citadel-root".to_string(),
            citadel.root().display().to_string(),
            "--citadel-token-file".to_string(),
            citadel.token(account).display().to_string(),
            "--citadel-hostname".to_string(),
            "localhost".to_string(),
            "--service-account".to_string(),
            account.to_string(),
        ]
    };
    let gateway_args = citadel_args("egressgateway");
    let mut gateway_all: Vec<&str> = gateway_args.iter().map(String::as_str).collect();
    let certs_dir = gateway_certs.display().to_string();
    gateway_all.extend([
        "--type",
        "router",
        "--pod",
        "istio-egressgateway-1",
        "--labels",
        "istio=egressgateway",
        "--certs-dir",
        &certs_dir,
    ]);
    let mut gateway = local_proxy(xds, &gateway_all).await;
    let client_args = citadel_args("client");
    let mut client_all: Vec<&str> = client_args.iter().map(String::as_str).collect();
    client_all.extend(["--pod", "client-1", "--labels", "app=client"]);
    let _sidecar = local_proxy(xds, &client_all).await;

    install_crypto();
    let app = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{egress}")).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (status, body) = get_when_served(&app, "http://api.example.com/", &mut gateway).await;
    assert_eq!((status, body.as_str()), (200, "from outside"));
    // It went through the gateway: counted there, by its cluster.
    let (_, stats) = get(gateway.1, "/stats/prometheus").await.unwrap();
    let counted = r#"proxy_requests_total{direction="outbound",cluster="outbound|443||api.example.com",response_code="200"} 1"#;
    assert!(stats.lines().any(|l| l == counted), "{stats}");
}

#[tokio::test]
async fn a_tcp_server_forwards_by_the_virtual_services_tcp_route() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo_addr = echo_server().await;
    let tcp = free_addr();
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: ingress, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {tcp_port}, name: tcp, protocol: TCP}}
    bind: 127.0.0.1
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [\"*\"]
  gateways: [ingress]
  tcp:
  - match: [{{port: {tcp_port}}}]
    route: [{{destination: {{host: echo.shop.svc.cluster.local, port: {{number: 7000}}}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 7000, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo_port}}}, labels: {{app: echo}}}}]
",
        tcp_port = tcp.port(),
        echo_port = echo_addr.port(),
    );
    let dir = config_dir(&[("tcp.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let _gateway = ingress_gateway(xds, &[]).await;
    // Ready means every listener is bound: the server takes connections.
    let mut conn = tokio::net::TcpStream::connect(tcp).await.unwrap();
    conn.write_all(b"over tcp").await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back))
        .await
        .expect("echoed in time")
        .unwrap();
    assert_eq!(&back, b"over tcp");
}

#[tokio::test]
async fn auto_passthrough_sends_a_connection_where_its_server_name_says() {
    // Istio 1.1's multi-cluster entry: the SNI names the cluster
    // (`outbound_.<port>_.<subset>_.<host>`), and the caller's own TLS
    // passes through to the workload.
    let sni = "outbound_.8080_._.web.shop.svc.cluster.local";
    let (backend, backend_ca) = tls_server(&[sni], "reached by name");
    let gateway_port = free_addr();
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: cross-network, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {port}, name: tls, protocol: TLS}}
    bind: 127.0.0.1
    hosts: [\"*.svc.cluster.local\"]
    tls: {{mode: AUTO_PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 8080, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {backend_port}}}, labels: {{app: web}}}}]
",
        port = gateway_port.port(),
        backend_port = backend.port(),
    );
    let dir = config_dir(&[("auto-passthrough.yaml", &config)]);
    let (_galley, _pilot, xds) = galley_and_pilot(dir.path(), &[]).await;
    let _gateway = ingress_gateway(xds, &[]).await;
    install_crypto();
    let ca = reqwest::Certificate::from_pem(backend_ca.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .resolve(sni, gateway_port)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!("https://{sni}:{}/", gateway_port.port());
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "reached by name");
}
