//! The client library against the real Mixer over gRPC: decisions cached by
//! what they read, fail open and closed, reports batched and delta-encoded.

mod common;

use std::time::Duration;

use mixer_client::{
    attributes::{Bag, Value},
    client::{Client, ClientOptions, Verdict},
};
use tonic::transport::Channel;

const CONFIG: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: istioproxy, namespace: istio-system}
spec:
  attributes:
    destination.service.host: {valueType: STRING}
    request.headers: {valueType: STRING_MAP}
    response.code: {valueType: INT64}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyall, namespace: istio-system}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: "no"}, valid_duration: 60s, valid_use_count: 100}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: denyrequest, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-jason, namespace: istio-system}
spec:
  match: request.headers["end-user"] == "jason"
  actions: [{handler: denyall, instances: [denyrequest]}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: metric
  params:
    value: "1"
    dimensions:
      response_code: response.code | 0
      user: request.headers["end-user"] | "none"
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: prometheus, namespace: istio-system}
spec:
  compiledAdapter: prometheus
  params:
    metrics: [{name: requests_total, instance_name: requestcount.instance.istio-system, kind: COUNTER, label_names: [response_code, user]}]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: prom, namespace: istio-system}
spec:
  actions: [{handler: prometheus, instances: [requestcount]}]
"#;

struct Mixer {
    running: common::Running,
}

/// A telemetry Mixer with `CONFIG`. Mixer answers nothing before its
/// config is in, so the first check already sees it.
async fn start() -> Mixer {
    let mixer = Mixer {
        running: common::start(CONFIG, mixer::Role::Telemetry).await,
    };
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        mixer.client(false, 1).check(&request("jason", "curl")),
    )
    .await
    .unwrap();
    assert_ne!(first, Verdict::Allow, "answered before the config was in");
    mixer
}

impl Mixer {
    fn client(&self, fail_open: bool, batch_size: usize) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.running.grpc))
            .unwrap()
            .connect_lazy();
        Client::new(
            channel,
            ClientOptions {
                fail_open,
                batch_size,
                ..Default::default()
            },
        )
    }

    /// Check RPCs Mixer has answered.
    fn checks(&self) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.running.admin.registry())
            .unwrap();
        text.lines()
            .filter(|l| l.contains("checks_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }
}

fn request(user: &str, agent: &str) -> Bag {
    Bag::from([
        (
            "destination.service.host".into(),
            Value::String("ratings.shop.svc.cluster.local".into()),
        ),
        (
            "request.headers".into(),
            Value::StringMap(
                [
                    ("end-user".to_string(), user.to_string()),
                    ("user-agent".to_string(), agent.to_string()),
                ]
                .into(),
            ),
        ),
    ])
}

#[tokio::test]
async fn decisions_are_cached_by_what_they_read() {
    let mixer = start().await;
    let client = mixer.client(false, 10);
    let before = mixer.checks();
    let denied = Verdict::Deny {
        code: 7,
        message: "no".into(),
    };
    assert_eq!(client.check(&request("jason", "curl")).await, denied);
    // Same user, another agent: the decision only read the user.
    assert_eq!(client.check(&request("jason", "firefox")).await, denied);
    assert_eq!(mixer.checks() - before, 1.0, "one RPC for both");
    // Another user is another decision.
    assert_eq!(client.check(&request("mary", "curl")).await, Verdict::Allow);
    assert_eq!(client.check(&request("mary", "wget")).await, Verdict::Allow);
    assert_eq!(mixer.checks() - before, 2.0);
}

#[tokio::test]
async fn without_mixer_checks_fail_open_or_closed() {
    let nowhere = testkit::free_addr();
    let channel = || {
        Channel::from_shared(format!("http://{nowhere}"))
            .unwrap()
            .connect_lazy()
    };
    let open = Client::new(
        channel(),
        ClientOptions {
            fail_open: true,
            batch_size: 1,
            ..Default::default()
        },
    );
    assert_eq!(open.check(&request("jason", "curl")).await, Verdict::Allow);
    let closed = Client::new(
        channel(),
        ClientOptions {
            fail_open: false,
            batch_size: 1,
            ..Default::default()
        },
    );
    let Verdict::Deny { code, message } = closed.check(&request("jason", "curl")).await else {
        panic!("allowed without mixer");
    };
    assert_eq!(code, 14);
    assert!(message.contains("mixer check failed"), "{message}");
}

/// Passes every connection `listener` accepts on to `target`, as a Mixer
/// at `listener`'s address would answer.
async fn forward(listener: tokio::net::TcpListener, target: std::net::SocketAddr) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

#[tokio::test]
async fn a_check_tried_again_waits_out_a_mixer_restart() {
    let mixer = start().await;
    // Mixer comes back at `addr` after 300 ms, as a restarted one would.
    let addr = testkit::free_addr();
    let target = mixer.running.grpc;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        forward(listener, target).await;
    });
    let client = |retries| {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let options = ClientOptions {
            fail_open: false,
            retries,
            ..Default::default()
        };
        Client::new(channel, options)
    };
    let started = std::time::Instant::now();
    let Verdict::Deny { code, .. } = client(0).check(&request("jason", "curl")).await else {
        panic!("allowed without mixer");
    };
    assert_eq!(code, 14, "without retries: UNAVAILABLE at once");
    assert!(started.elapsed() < Duration::from_millis(300));
    let verdict = client(10).check(&request("mary", "wget")).await;
    assert_eq!(verdict, Verdict::Allow, "tried again until Mixer was back");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn reports_are_batched_and_delta_encoded() {
    let mixer = start().await;
    let client = mixer.client(true, 3);
    let served = |user: &str, code: i64| {
        let mut bag = request(user, "curl");
        bag.insert("response.code".into(), Value::Int64(code));
        bag
    };
    // Two queued: nothing sent yet.
    client.report(served("mary", 200)).await.unwrap();
    client.report(served("mary", 503)).await.unwrap();
    let metrics = || async {
        testkit::get(mixer.running.prometheus, "/metrics")
            .await
            .unwrap()
            .1
    };
    assert!(
        !metrics().await.contains("istio_requests_total{"),
        "sent before the batch filled"
    );
    // The third fills the batch; each bag counts with its own values.
    client.report(served("jason", 200)).await.unwrap();
    let text = metrics().await;
    for series in [
        r#"istio_requests_total{response_code="200",user="mary"} 1"#,
        r#"istio_requests_total{response_code="503",user="mary"} 1"#,
        r#"istio_requests_total{response_code="200",user="jason"} 1"#,
    ] {
        assert!(text.contains(series), "{series}\n{text}");
    }
    // A bag without an attribute the one before had: sent independently,
    // so the missing code is not carried over.
    client.report(request("ann", "curl")).await.unwrap();
    client.flush().await.unwrap();
    let text = metrics().await;
    assert!(
        text.contains(r#"istio_requests_total{response_code="0",user="ann"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn quotas_are_asked_on_every_check_and_exhaustion_denies() {
    let quota = r#"
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quotahandler, namespace: istio-system}
spec:
  compiledAdapter: memquota
  params:
    quotas: [{name: rq.instance.istio-system, maxAmount: 2, validDuration: 60s}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: rq, namespace: istio-system}
spec: {compiledTemplate: quota, params: {dimensions: {user: 'request.headers["end-user"] | "none"'}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec: {actions: [{handler: quotahandler, instances: [rq]}]}
"#;
    let running = common::start(&format!("{CONFIG}{quota}"), mixer::Role::Policy).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect_lazy();
    let client = Client::new(
        channel,
        ClientOptions {
            fail_open: false,
            quotas: vec!["rq".into()],
            ..Default::default()
        },
    );
    let mary = request("mary", "curl");
    assert_eq!(client.check(&mary).await, Verdict::Allow);
    assert_eq!(client.check(&mary).await, Verdict::Allow);
    // The third in the window finds the quota spent, though the check
    // itself (not jason) would be allowed and cached.
    assert_eq!(
        client.check(&mary).await,
        Verdict::Deny {
            code: 8,
            message: "Quota is exhausted for: rq".into()
        }
    );
    // Another user has a quota of their own.
    assert_eq!(client.check(&request("ann", "curl")).await, Verdict::Allow);
}

/// A Mixer that dies with a Check in flight (`kill -9`: the connection
/// closes under the call) is waited out like one that is down.
#[tokio::test]
async fn a_check_whose_mixer_dies_mid_call_is_tried_again() {
    use tokio::io::AsyncReadExt;
    let mixer = start().await;
    let addr = testkit::free_addr();
    let target = mixer.running.grpc;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        // The first connection is read from, then closed with the call in
        // flight; later ones reach Mixer.
        let (mut first, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let _ = first.read(&mut buf).await;
        drop(first);
        forward(listener, target).await;
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let client = Client::new(
        channel,
        ClientOptions {
            fail_open: false,
            retries: 10,
            ..Default::default()
        },
    );
    let verdict = client.check(&request("mary", "wget")).await;
    assert_eq!(verdict, Verdict::Allow, "{verdict:?}");
}
