//! Traces from the control plane, received by an OTLP receiver: one edit
//! of a config file is one trace, from Galley's reload through its MCP
//! push (the nonce carries the trace across) and Pilot's apply and model
//! rebuild to every proxy's ACK, and the proxies' own spans of taking it
//! (the xDS nonce carries it on); Citadel's signings and Mixer's Checks
//! are spans too. In both topologies: processes apart, and one process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::{otlp::ReceivedSpan, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_is_one_trace_from_galleys_reload_to_the_proxies_acks_split() {
    edit_traced("split").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_is_one_trace_from_galleys_reload_to_the_proxies_acks_monolith() {
    edit_traced("monolith").await;
}

/// The one span in `spans` named `name` (or starting with it, for `prefix`
/// names) whose parent is `parent`.
fn child<'a>(
    spans: &'a [ReceivedSpan],
    parent: &ReceivedSpan,
    name: &str,
) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.parent_span_id == parent.span_id && s.name.starts_with(name))
}

/// Galley's reload of an edit made at `edited_at` (Unix nanoseconds), and
/// its push of the edited VirtualServices.
fn edit_push(spans: &[ReceivedSpan], edited_at: u64) -> Option<(&ReceivedSpan, &ReceivedSpan)> {
    let reload = spans.iter().find(|s| {
        s.name == "galley reload"
            && s.start_unix_nano >= edited_at
            && child(spans, s, "mcp push").is_some()
    })?;
    let push = child(
        spans,
        reload,
        "mcp push istio/networking/v1alpha3/virtualservices",
    )?;
    Some((reload, push))
}

async fn edit_traced(topology: &str) {
    let (receiver, addr) = otlp::Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let (up, lines) = meshctl_up_with_env(
        &["--topology", topology],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Batches every 100 ms, not 5 s: the test waits on them.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let config: std::path::PathBuf = lines
        .iter()
        .find_map(|l| l.strip_prefix("config: "))
        .expect("the config directory")
        .trim()
        .into();
    let (galley, pilot) = match topology {
        "monolith" => ("monolith", "monolith"),
        _ => ("galley", "pilot"),
    };
    // Every sidecar asked Citadel for its certificate.
    receiver
        .wait_for("Citadel's signings", Duration::from_secs(20), |spans| {
            let signed = spans.iter().filter(|s| s.name == "citadel sign").count();
            (signed >= 7).then_some(())
        })
        .await;

    let edited_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let file = config.join("virtual-services.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text
        .replace("subset: v1}, weight: 50", "subset: v1}, weight: 100")
        .replace("subset: v3}, weight: 50", "subset: v3}, weight: 0");
    assert_ne!(edited, text);
    std::fs::write(&file, edited).unwrap();

    // The reload that read the edit, and the chain under it.
    let (reload, push, apply, rebuild, acks, taken) = receiver
        .wait_for("the edit's trace, to a proxy's ACK", WAIT, |spans| {
            let (reload, push) = edit_push(spans, edited_at)?;
            let apply = child(spans, push, "mcp apply")?;
            let rebuild = child(spans, apply, "pilot model rebuild")?;
            let acks: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.parent_span_id == rebuild.span_id && s.name.starts_with("xds "))
                .cloned()
                .collect();
            // productpage's sidecar routes to reviews: its RDS answer, and
            // its own span of taking the routes (the xDS nonce carried the
            // trace to it).
            let productpage = acks.iter().any(|a| {
                a.name == "xds RouteConfiguration to ACK"
                    && a.attribute("xds.node")
                        .is_some_and(|n| n.contains("productpage-v1-0"))
            });
            let taken = spans.iter().find(|s| {
                s.parent_span_id == rebuild.span_id
                    && s.name == "proxy xds apply RouteConfiguration"
                    && s.service == "productpage-v1-0.bookinfo"
            })?;
            productpage.then(|| {
                (
                    reload.clone(),
                    push.clone(),
                    apply.clone(),
                    rebuild.clone(),
                    acks,
                    taken.clone(),
                )
            })
        })
        .await;
    // One trace, across the processes that did each part.
    for span in [&push, &apply, &rebuild] {
        assert_eq!(span.trace_id, reload.trace_id, "{span:?}");
    }
    assert!(
        reload.parent_span_id.is_empty(),
        "the reload starts the trace"
    );
    assert_eq!(
        (reload.service.as_str(), reload.scope.as_str()),
        (galley, "galley")
    );
    assert_eq!(push.service, galley, "{push:?}");
    assert_eq!(apply.service, pilot, "{apply:?}");
    assert_eq!(
        (rebuild.service.as_str(), rebuild.scope.as_str()),
        (pilot, "pilot")
    );
    for ack in &acks {
        assert_eq!(ack.trace_id, reload.trace_id);
        assert_eq!(ack.attribute("xds.acked"), Some("true"), "{ack:?}");
        assert!(!ack.failed, "{ack:?}");
        // From the push to its answer.
        assert!(ack.start_unix_nano >= rebuild.start_unix_nano, "{ack:?}");
        assert!(ack.end_unix_nano >= ack.start_unix_nano, "{ack:?}");
    }
    assert_eq!(taken.trace_id, reload.trace_id, "{taken:?}");
    assert!(!taken.failed, "{taken:?}");
    let last_ack = acks.iter().map(|a| a.end_unix_nano).max().unwrap();
    eprintln!(
        "{topology}: the edit's trace: reload to Pilot's apply {:.1} ms, to the last of {} ACKs {:.1} ms",
        (apply.end_unix_nano - reload.start_unix_nano) as f64 / 1e6,
        acks.len(),
        (last_ack - reload.start_unix_nano) as f64 / 1e6,
    );
    assert_eq!(
        push.attribute("mcp.collection"),
        Some("istio/networking/v1alpha3/virtualservices")
    );
    // The push lasted until Pilot's ACK: its end is after Pilot applied it.
    assert!(
        push.end_unix_nano >= apply.end_unix_nano,
        "{push:?} {apply:?}"
    );

    // Mixer's Checks are spans too, in the trace of the request they
    // check: a sampled request through productpage's sidecar, whose span
    // is the parent of the Check its sidecar makes.
    let productpage = up_table(&lines)
        .iter()
        .find(|r| r[0] == "productpage-v1-proxy")
        .and_then(|r| r.iter().find_map(|f| f.strip_prefix("inbound=")))
        .map(|a| a.parse::<std::net::SocketAddr>().unwrap())
        .unwrap();
    let trace = "5b8efff798038103d269b633813fc60c";
    install_crypto();
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{productpage}/productpage"))
        .header("traceparent", format!("00-{trace}-eee19b7ec3c1b174-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (request, check) = receiver
        .wait_for(
            "the request's Check, in its trace",
            Duration::from_secs(20),
            |spans| {
                let request = spans.iter().find(|s| {
                    s.trace_id == trace
                        && s.service == "productpage-v1-0.bookinfo"
                        && s.parent_span_id == "eee19b7ec3c1b174"
                })?;
                let check = spans
                    .iter()
                    .find(|s| s.name == "mixer check" && s.parent_span_id == request.span_id)?;
                Some((request.clone(), check.clone()))
            },
        )
        .await;
    assert_eq!(check.trace_id, request.trace_id);
    assert_eq!(check.scope, "mixer", "{check:?}");
    assert!(up.terminate().await.success());
}

/// A cluster that follows another: an edit at the primary's Galley is one
/// trace through the relay Galley (its apply, its merge, its push) to the
/// follower's Pilot.
#[tokio::test]
async fn an_edit_at_the_primary_is_one_trace_through_the_relay() {
    let (receiver, addr) = otlp::Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let route = |timeout: &str| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: reviews, namespace: shop}}\nspec:\n  hosts: [reviews.shop.svc.cluster.local]\n  http: [{{route: [{{destination: {{host: reviews.shop.svc.cluster.local}}}}], timeout: {timeout}}}]\n"
        )
    };
    let primary_dir = config_dir(&[("routes.yaml", &route("2s"))]);
    let relay_dir = config_dir(&[]);
    let mut primary = Galley::spawn_with_env(primary_dir.path(), free_addr(), &[], &env);
    primary.proc.ready(primary.admin).await;
    let follow = primary.mcp.to_string();
    let mut relay =
        Galley::spawn_with_env(relay_dir.path(), free_addr(), &["--follow", &follow], &env);
    relay.proc.ready(relay.admin).await;
    let (mut pilot, pilot_admin) = start_pilot_with_env(relay.mcp, free_addr(), &[], &env);
    pilot.ready(pilot_admin).await;

    let edited_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    std::fs::write(primary_dir.path().join("routes.yaml"), route("3s")).unwrap();
    let chain = receiver
        .wait_for(
            "the edit's trace, through the relay to Pilot",
            WAIT,
            |spans| {
                let (reload, push) = edit_push(spans, edited_at)?;
                let at_relay = child(spans, push, "mcp apply")?;
                let merge = child(spans, at_relay, "galley relay merge")?;
                let relayed = child(
                    spans,
                    merge,
                    "mcp push istio/networking/v1alpha3/virtualservices",
                )?;
                let at_pilot = child(spans, relayed, "mcp apply")?;
                let rebuild = child(spans, at_pilot, "pilot model rebuild")?;
                Some([reload, push, at_relay, merge, relayed, at_pilot, rebuild].map(Clone::clone))
            },
        )
        .await;
    assert!(chain.iter().all(|s| s.trace_id == chain[0].trace_id));
    let services: Vec<&str> = chain.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        [
            "galley", "galley", "galley", "galley", "galley", "pilot", "pilot"
        ],
        "primary, relay, Pilot"
    );
    for proc in [pilot, relay.proc, primary.proc] {
        assert!(proc.terminate().await.success());
    }
}
