//! Kubernetes mode, for real: a pod's network namespace with the iptables
//! rules `proxy init` writes, the proxy running as UID 1337 with
//! `--interception redirect`, and an application that knows nothing of the
//! mesh. Its outbound calls to a service address are captured on 15001 and
//! routed by their original destination; calls into the pod from another
//! namespace are captured on 15006 and handed to the application through
//! the proxy. Galley and Pilot run inside the pod's namespace, on its
//! loopback, which the rules leave alone. Needs root (CI runs as root) and
//! iptables, which the test installs when missing.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
};

use testkit::{
    bin, config_dir,
    netns::{Netns, ensure_iptables},
};

const POD_IP: &str = "10.77.0.1";
const PEER_IP: &str = "10.77.0.2";
/// The ratings service's virtual address; nothing listens there.
const RATINGS_VIP: &str = "10.96.0.5";

fn config() -> String {
    format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  addresses: [{RATINGS_VIP}]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {PEER_IP}, labels: {{app: ratings}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /teapot}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
  - route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {POD_IP}, labels: {{app: reviews}}}}]
"
    )
}

/// An HTTP server on `listener` answering `NAME saw PEER PATH`, PEER
/// being the address the connection came from.
fn serve_http(name: &'static str, listener: TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let app = axum::Router::new().fallback(
        move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
              uri: axum::http::Uri| async move {
            format!("{name} saw {} {}", peer.ip(), uri.path())
        },
    );
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
}

/// A TCP server on `listener` that sends back what it reads.
fn serve_echo(listener: TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_traffic_crosses_the_proxy_both_ways() {
    ensure_iptables();
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    testkit::netns::link(&pod, POD_IP, &peer, PEER_IP);
    // The service address is routed out of the pod, as a cluster IP is.
    pod.ip(&["route", "add", "default", "dev", "veth0"]);

    // The application, on the pod's port 9080, and two servers elsewhere.
    pod.run(|| serve_http("reviews", TcpListener::bind("0.0.0.0:9080").unwrap()));
    peer.run(|| {
        serve_http(
            "ratings",
            TcpListener::bind(format!("{PEER_IP}:9080")).unwrap(),
        );
        serve_echo(TcpListener::bind(format!("{PEER_IP}:7777")).unwrap());
    });

    let dir = config_dir(&[("mesh.yaml", &config())]);
    let init = pod.run(|| {
        std::process::Command::new(bin("proxy"))
            .args(["init", "--proxy-uid", "1337"])
            .output()
            .unwrap()
    });
    assert!(
        init.status.success(),
        "proxy init: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let _galley = pod.start(
        "galley",
        &[
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--mcp-addr",
            "127.0.0.1:9901",
            "--admin-addr",
            "127.0.0.1:9876",
        ],
        None,
    );
    let _pilot = pod.start(
        "pilot",
        &[
            "--mcp-server",
            "127.0.0.1:9901",
            "--xds-addr",
            "127.0.0.1:15010",
            "--admin-addr",
            "127.0.0.1:8080",
        ],
        None,
    );
    let _proxy = pod.start(
        "proxy",
        &[
            "--pilot",
            "127.0.0.1:15010",
            "--ip",
            POD_IP,
            "--pod",
            "reviews-1",
            "--namespace",
            "shop",
            "--labels",
            "app=reviews",
            "--interception",
            "redirect",
            "--admin-addr",
            "127.0.0.1:15000",
            "--stats-addr",
            "127.0.0.1:15090",
            "--health-addr",
            "127.0.0.1:15020",
        ],
        Some(1337),
    );
    pod.wait_for("127.0.0.1:15020", "proxy", "/healthz/ready", &[], |s, _| {
        s == 200
    })
    .await;

    // Outbound: the application calls the service address; the proxy
    // routes by the original destination and the route's fault proves it
    // was the one answering.
    let ratings = format!("{RATINGS_VIP}:9080");
    let host = "ratings.shop.svc.cluster.local";
    let (_, body) = pod
        .wait_for(&ratings, host, "/stars", &[], |s, _| s == 200)
        .await;
    assert_eq!(body, format!("ratings saw {POD_IP} /stars"));
    let (status, _) = pod.get(&ratings, host, "/teapot", &[]).unwrap();
    assert_eq!(status, 418, "the route's abort fault applies");

    // Outbound to an address no service has: passed through unchanged.
    let echoed = pod.run(|| {
        let mut stream = TcpStream::connect(format!("{PEER_IP}:7777")).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut back = [0; 4];
        stream.read_exact(&mut back).unwrap();
        back
    });
    assert_eq!(&echoed, b"ping");

    // Inbound: a call from outside the pod reaches the application from
    // the proxy, on the pod's loopback.
    let (status, body) = peer
        .get(&format!("{POD_IP}:9080"), "reviews", "/hello", &[])
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "reviews saw 127.0.0.1 /hello")
    );

    // The proxy counted both directions.
    let (_, stats) = pod
        .get("127.0.0.1:15090", "proxy", "/stats/prometheus", &[])
        .unwrap();
    for cluster in [
        "outbound|9080||ratings.shop.svc.cluster.local",
        "inbound|9080|http|reviews.shop.svc.cluster.local",
    ] {
        assert!(
            stats.lines().any(|l| l.contains(cluster)),
            "no stats for {cluster}: {stats}"
        );
    }
}
