//! Mixer over real gRPC, config through the real MCP path (an in-process
//! MCP source serving parsed YAML): Check decisions with their status,
//! validity and referenced attributes, quotas granted, Reports decoded,
//! malformed attributes refused, config changes applied.

mod common;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use mesh_api::pb::istio::mixer::v1::{
    CheckRequest, CheckResponse, CompressedAttributes, ReportRequest, check_request::QuotaParams,
    mixer_client::MixerClient, referenced_attributes::Condition,
};
use mixer_client::attributes::{Bag, Compressor, Value, dictionary::GLOBAL_WORDS};
use tonic::{Code, transport::Channel};

const CONFIG: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: istioproxy, namespace: istio-system}
spec:
  attributes:
    destination.service.host: {valueType: STRING}
    request.headers: {valueType: STRING_MAP}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyall, namespace: istio-system}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: "ratings is closed to jason"}, validDuration: 10s}
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
  match: destination.service.host == "ratings.shop.svc.cluster.local" && request.headers["end-user"] == "jason"
  actions: [{handler: denyall, instances: [denyrequest]}]
"#;

struct Mixer {
    running: common::Running,
    client: MixerClient<Channel>,
}

async fn start(yaml: &str) -> Mixer {
    start_as(yaml, mixer::Role::Policy).await
}

async fn start_as(yaml: &str, role: mixer::Role) -> Mixer {
    let running = common::start(yaml, role).await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect_lazy();
    Mixer {
        running,
        client: MixerClient::new(channel),
    }
}

fn request_from(user: Option<&str>) -> Bag {
    let mut headers =
        std::collections::BTreeMap::from([(":path".to_string(), "/ratings/0".to_string())]);
    if let Some(user) = user {
        headers.insert("end-user".into(), user.into());
    }
    Bag::from([
        (
            "destination.service.host".into(),
            Value::String("ratings.shop.svc.cluster.local".into()),
        ),
        ("request.headers".into(), Value::StringMap(headers)),
    ])
}

fn compressed(bag: &Bag) -> CompressedAttributes {
    let mut compressor = Compressor::default();
    let mut attributes = compressor.compress(bag);
    attributes.words = compressor.into_words();
    attributes
}

/// A Check of `bag` asking for 3 of `requestcount`, with a new
/// deduplication id.
async fn check(mixer: &mut Mixer, bag: &Bag) -> CheckResponse {
    static SENT: AtomicU64 = AtomicU64::new(0);
    let id = SENT.fetch_add(1, Ordering::Relaxed);
    check_with_id(mixer, bag, &id.to_string()).await
}

async fn check_with_id(mixer: &mut Mixer, bag: &Bag, deduplication_id: &str) -> CheckResponse {
    mixer
        .client
        .check(CheckRequest {
            attributes: Some(compressed(bag)),
            global_word_count: GLOBAL_WORDS.len() as u32,
            deduplication_id: deduplication_id.into(),
            quotas: [(
                "requestcount".to_string(),
                QuotaParams {
                    amount: 3,
                    best_effort: false,
                },
            )]
            .into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Checks until the answer for `bag` has `code`: the config arrives over
/// MCP after Mixer starts, and changes take a moment to apply.
async fn until_code(mixer: &mut Mixer, bag: &Bag, code: i32) -> CheckResponse {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let response = check(mixer, bag).await;
            let status = response.precondition.as_ref().unwrap().status.as_ref();
            if status.unwrap().code == code {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the decision in time")
}

#[tokio::test]
async fn check_decides_by_the_rules_and_says_what_it_read() {
    let mut mixer = start(CONFIG).await;
    let jason = request_from(Some("jason"));
    let response = until_code(&mut mixer, &jason, 7).await;
    let precondition = response.precondition.unwrap();
    assert_eq!(
        precondition.status.unwrap().message,
        "ratings is closed to jason"
    );
    assert_eq!(precondition.valid_duration.unwrap().seconds, 10);
    // What the decision read: the host exactly, and the one header.
    let referenced = precondition.referenced_attributes.unwrap();
    let word = |i: i32| -> String {
        if i >= 0 {
            GLOBAL_WORDS[i as usize].to_string()
        } else {
            referenced.words[(-i - 1) as usize].clone()
        }
    };
    let mut read: Vec<(String, Option<String>, i32)> = referenced
        .attribute_matches
        .iter()
        .map(|m| {
            let key = (m.map_key != 0).then(|| word(m.map_key));
            (word(m.name), key, m.condition)
        })
        .collect();
    read.sort();
    assert_eq!(
        read,
        [
            (
                "destination.service.host".into(),
                None,
                Condition::Exact as i32
            ),
            (
                "request.headers".into(),
                Some("end-user".into()),
                Condition::Exact as i32
            ),
        ]
    );
    // A quota no handler counts is granted as asked.
    assert_eq!(response.quotas["requestcount"].granted_amount, 3);

    let response = check(&mut mixer, &request_from(Some("mary"))).await;
    assert_eq!(response.precondition.unwrap().status.unwrap().code, 0);

    // A config change applies: without the rule, jason passes too.
    let without_rule = CONFIG.split("---").take(3).collect::<Vec<_>>().join("---");
    common::publish(&mixer.running.store, &without_rule);
    until_code(&mut mixer, &jason, 0).await;
}

#[tokio::test]
async fn a_broken_rule_keeps_its_last_good_version_in_force() {
    let mut mixer = start(CONFIG).await;
    let jason = request_from(Some("jason"));
    until_code(&mut mixer, &jason, 7).await;
    // The rule's new version compares a string with a number, and a new
    // rule names a handler that does not exist.
    let broken = CONFIG.replace(
        r#"request.headers["end-user"] == "jason""#,
        r#"request.headers["end-user"] == 3"#,
    ) + r#"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: dangling, namespace: istio-system}
spec:
  actions: [{handler: nosuch, instances: [denyrequest]}]
"#;
    common::publish(&mixer.running.store, &broken);
    let problems = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, page) = testkit::get(mixer.running.admin_addr, "/debug/config")
                .await
                .unwrap();
            let page: serde_json::Value = serde_json::from_str(&page).unwrap();
            if page["problems"].as_array().unwrap().len() == 2 {
                return page["problems"].to_string();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("both problems reported");
    assert!(
        problems.contains("rule deny-jason.rule.istio-system: match")
            && problems.contains("STRING with INT64")
            && problems.contains("its last good version stays in force"),
        "{problems}"
    );
    assert!(
        problems.contains(
            r#"rule dangling.rule.istio-system: handler \"nosuch\" is not defined; left out"#
        ),
        "{problems}"
    );
    // The last good deny-jason still decides.
    let response = check(&mut mixer, &jason).await;
    assert_eq!(response.precondition.unwrap().status.unwrap().code, 7);
    let response = check(&mut mixer, &request_from(Some("mary"))).await;
    assert_eq!(response.precondition.unwrap().status.unwrap().code, 0);
}

#[tokio::test]
async fn with_galley_away_the_last_config_keeps_deciding() {
    let mut mixer = start(CONFIG).await;
    let jason = request_from(Some("jason"));
    until_code(&mut mixer, &jason, 7).await;
    mixer.running.source_stop.cancel();
    let admin = mixer.running.admin_addr;
    testkit::wait_for_http(admin, "/metrics", |_, metrics| {
        metrics
            .contains(r#"mixer_mcp_sink_streams_open{collection="istio/policy/v1beta1/rules"} 0"#)
    })
    .await;
    let response = check(&mut mixer, &jason).await;
    assert_eq!(response.precondition.unwrap().status.unwrap().code, 7);
}

#[tokio::test]
async fn malformed_attributes_are_refused_and_reports_decoded() {
    let mut mixer = start(CONFIG).await;
    let mut bad = CompressedAttributes::default();
    bad.strings.insert(-4, 0);
    let refused = mixer
        .client
        .check(CheckRequest {
            attributes: Some(bad.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("attribute name index -4"),
        "{}",
        refused.message()
    );

    let mut compressor = Compressor::default();
    let first = compressor.compress(&request_from(Some("jason")));
    let second = compressor.compress(&Bag::from([("response.code".into(), Value::Int64(503))]));
    mixer
        .client
        .report(ReportRequest {
            attributes: vec![first, second],
            default_words: compressor.into_words(),
            global_word_count: GLOBAL_WORDS.len() as u32,
            repeated_attributes_semantics: 0,
        })
        .await
        .unwrap();
    let refused = mixer
        .client
        .report(ReportRequest {
            attributes: vec![bad],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("report entry 0"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn memquota_grants_until_the_limit() {
    let quota = r#"
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quotahandler, namespace: istio-system}
spec:
  compiledAdapter: memquota
  params:
    quotas: [{name: requestcount.instance.istio-system, maxAmount: 5, validDuration: 2s}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: quota
  params: {dimensions: {destination: destination.service.host}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions: [{handler: quotahandler, instances: [requestcount]}]
"#;
    let mut mixer = start(&format!("{CONFIG}{quota}")).await;
    let mary = request_from(Some("mary"));
    // Once the config is in, 3 of 5 are taken at a time: 3, then 0 (all or
    // nothing), with the window as the grant's validity.
    let (granted, id) = tokio::time::timeout(Duration::from_secs(10), async {
        for id in 0.. {
            let id = format!("first-{id}");
            let response = check_with_id(&mut mixer, &mary, &id).await;
            let result = &response.quotas["requestcount"];
            if result.valid_duration.unwrap().seconds == 2 {
                return (result.granted_amount, id);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        unreachable!()
    })
    .await
    .unwrap();
    assert_eq!(granted, 3);
    // The same Check again (a client's retry) is the same grant, not a
    // second allocation.
    let retried = check_with_id(&mut mixer, &mary, &id).await;
    assert_eq!(retried.quotas["requestcount"].granted_amount, 3);
    let exhausted = std::time::Instant::now();
    let response = check(&mut mixer, &mary).await;
    assert_eq!(response.quotas["requestcount"].granted_amount, 0);
    // The window slides: once the first grant is 2s old, 3 are free again.
    let refilled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let response = check(&mut mixer, &mary).await;
            if response.quotas["requestcount"].granted_amount == 3 {
                return exhausted.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the quota refilled");
    assert!(refilled > Duration::from_millis(1500), "{refilled:?}");
}

#[tokio::test]
async fn list_checker_allows_listed_users_and_denies_the_rest() {
    let whitelist = r#"
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: staff, namespace: istio-system}
spec:
  compiledAdapter: listchecker
  params: {overrides: [mary, jason], blacklist: false}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: user, namespace: istio-system}
spec: {compiledTemplate: listentry, params: {value: 'request.headers["end-user"] | "nobody"'}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: staff-only, namespace: istio-system}
spec: {actions: [{handler: staff, instances: [user]}]}
"#;
    let mut mixer = start(&format!("{CONFIG}{whitelist}")).await;
    let bob = until_code(&mut mixer, &request_from(Some("bob")), 7).await;
    let status = bob.precondition.unwrap().status.unwrap();
    assert_eq!(status.message, "bob is not whitelisted");
    let mary = check(&mut mixer, &request_from(Some("mary"))).await;
    assert_eq!(mary.precondition.unwrap().status.unwrap().code, 0);
    // No header: the instance's default, which is not listed either.
    let nobody = check(&mut mixer, &request_from(None)).await;
    let status = nobody.precondition.unwrap().status.unwrap();
    assert_eq!(
        (status.code, status.message.as_str()),
        (7, "nobody is not whitelisted")
    );
}

#[tokio::test]
async fn reports_reach_the_prometheus_exporter() {
    let telemetry = r#"
---
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: telemetry, namespace: istio-system}
spec:
  attributes:
    response.code: {valueType: INT64}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: metric
  params: {value: "1", dimensions: {destination_service: destination.service.host, response_code: response.code}}
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: prometheus, namespace: istio-system}
spec:
  compiledAdapter: prometheus
  params:
    metrics:
    - {name: requests_total, instanceName: requestcount.instance.istio-system, kind: COUNTER,
       labelNames: [destination_service, response_code]}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: promhttp, namespace: istio-system}
spec:
  actions: [{handler: prometheus, instances: [requestcount]}]
"#;
    let mut mixer = start_as(&format!("{CONFIG}{telemetry}"), mixer::Role::Telemetry).await;
    let prometheus = mixer.running.prometheus;
    let mut served = request_from(None);
    served.insert("response.code".into(), Value::Int64(200));
    let expected = r#"istio_requests_total{destination_service="ratings.shop.svc.cluster.local",response_code="200"}"#;
    // Reports before the config arrives count nothing; report until the
    // exporter shows the series.
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut compressor = Compressor::default();
            let attributes = compressor.compress(&served);
            mixer
                .client
                .report(ReportRequest {
                    attributes: vec![attributes],
                    default_words: compressor.into_words(),
                    global_word_count: GLOBAL_WORDS.len() as u32,
                    repeated_attributes_semantics: 0,
                })
                .await
                .unwrap();
            if let Some((200, text)) = testkit::get(prometheus, "/metrics").await
                && text.contains(expected)
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the metric exported in time");
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn over_the_rate_limit_requests_are_refused_at_once() {
    let running = common::start_limited(
        CONFIG,
        mixer::Role::Policy,
        mixer::shed::Limits {
            max_requests_per_second: 20.0,
            ..Default::default()
        },
    )
    .await;
    let channel = Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect_lazy();
    let attributes = compressed(&request_from(Some("mary")));
    let calls = (0..200).map(|_| {
        let mut client = MixerClient::new(channel.clone());
        let request = CheckRequest {
            attributes: Some(attributes.clone()),
            global_word_count: GLOBAL_WORDS.len() as u32,
            ..Default::default()
        };
        async move { client.check(request).await }
    });
    let results = futures::future::join_all(calls).await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let admitted = results.len() - refused.len();
    // A second's burst, and what refilled while the calls went out.
    assert!((20..60).contains(&admitted), "{admitted} admitted");
    for status in &refused {
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("overloaded"), "{status:?}");
    }
    let (_, metrics) = testkit::get(running.admin_addr, "/metrics").await.unwrap();
    let line = format!(
        "mixer_shed_requests_total{{reason=\"rate\"}} {}",
        refused.len()
    );
    assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
}
