//! The sidecar injector over real HTTPS, with AdmissionReview JSON in the
//! shape the Kubernetes API server sends for a ReplicaSet's pod; the
//! patches it answers applied with `json-patch`; `meshctl kube-inject`
//! giving the same pod; `proxy init --dry-run` printing the rules that
//! the pod's annotations ask for; and the config reloaded when edited.

use base64::Engine;
use serde_json::{Value, json};
use testkit::*;

const REVIEW: &str = include_str!("data/admission-review-pod.json");

/// A running injector, and a client that trusts its certificate.
struct Injector {
    proc: Proc,
    webhook: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    client: reqwest::Client,
    _certs: tempfile::TempDir,
}

async fn start(extra: &[&str]) -> Injector {
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path, cert) = webhook_certificate(certs.path());
    let (webhook, admin) = (free_addr(), free_addr());
    let (webhook_arg, admin_arg) = (webhook.to_string(), admin.to_string());
    let mut args = vec![
        "--webhook-addr",
        &webhook_arg,
        "--webhook-cert",
        cert_path.to_str().unwrap(),
        "--webhook-key",
        key_path.to_str().unwrap(),
        "--admin-addr",
        &admin_arg,
    ];
    args.extend_from_slice(extra);
    let mut proc = Proc::start("sidecar-injector", &args);
    proc.ready(admin).await;
    Injector {
        proc,
        webhook,
        admin,
        client: https_client(&cert),
        _certs: certs,
    }
}

impl Injector {
    /// POSTs `body` to `/inject`: the status and the answer's text.
    async fn post(&self, body: String) -> (u16, String) {
        let response = self
            .client
            .post(format!("https://{}/inject", self.webhook))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The review's answer, and the pod as the API server would store it
    /// (the patch, if any, applied).
    async fn review(&self, pod: &Value) -> (Value, Value) {
        let mut review: Value = serde_json::from_str(REVIEW).unwrap();
        review["request"]["object"] = pod.clone();
        let (status, text) = self.post(review.to_string()).await;
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        let response = &answer["response"];
        assert_eq!(response["uid"], review["request"]["uid"]);
        let mut stored = pod.clone();
        if let Some(patch) = response.get("patch") {
            assert_eq!(response["patchType"], "JSONPatch");
            // Go's []byte, as the API server decodes it from JSON: only a
            // base64 string (standard alphabet, padded) is accepted.
            let Value::String(text) = patch else {
                panic!("patch must be a base64 string, as the API server reads []byte: {patch}");
            };
            let patch = base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap();
            let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
            json_patch::patch(&mut stored, &patch).unwrap();
        }
        (response.clone(), stored)
    }
}

/// The pod of the recorded review.
fn pod() -> Value {
    let review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"].clone()
}

fn names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn container<'a>(pod: &'a Value, field: &str, name: &str) -> &'a Value {
    pod["spec"][field]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {field} {name} in {pod}"))
}

#[tokio::test]
async fn the_webhook_injects_opted_in_pods_and_leaves_the_rest_alone() {
    let injector = start(&[]).await;

    let (response, injected) = injector.review(&pod()).await;
    assert_eq!(response["allowed"], true);
    assert_eq!(names(&injected, "containers"), ["reviews", "istio-proxy"]);
    assert_eq!(names(&injected, "initContainers"), ["istio-init"]);
    assert_eq!(
        names(&injected, "volumes"),
        ["kube-api-access-x7k2p", "istio-certs"]
    );
    let proxy = container(&injected, "containers", "istio-proxy");
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        proxy["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15020})
    );
    let ports: Vec<&Value> = proxy["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    assert_eq!(ports, [&json!(15090), &json!(15020)]);
    let args = proxy["args"].to_string();
    assert!(
        args.contains("--labels=app=reviews,pod-template-hash=7f6d9c8b5,version=v1"),
        "{args}"
    );
    assert_eq!(
        injected["spec"]["volumes"][1]["secret"]["secretName"],
        "istio.bookinfo-reviews"
    );
    let status: Value = serde_json::from_str(
        injected["metadata"]["annotations"]["sidecar.istio.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["containers"], json!(["istio-proxy"]));
    assert_eq!(status["initContainers"], json!(["istio-init"]));

    // Injected already, opted out, on the host's network: unchanged.
    let mut refused = pod();
    refused["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
    let mut host = pod();
    host["spec"]["hostNetwork"] = json!(true);
    for unchanged in [injected.clone(), refused, host] {
        let (response, stored) = injector.review(&unchanged).await;
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none(), "{response}");
        assert_eq!(stored, unchanged);
    }

    // A broken review is answered with what is wrong, and the injector
    // carries on.
    let (status, text) = injector
        .post("{\"kind\": \"AdmissionReview\", ".into())
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("EOF"), "{text}");
    let (status, text) = injector
        .post(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string())
        .await;
    assert_eq!(
        (status, text.as_str()),
        (400, "an AdmissionReview without a request\n")
    );

    let (_, metrics) = get(injector.admin, "/metrics").await.unwrap();
    for line in [
        "sidecar_injector_injection_requests_total 4",
        "sidecar_injector_injection_success_total 1",
        "sidecar_injector_injection_skip_total 3",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    assert!(injector.proc.terminate().await.success());
}

#[tokio::test]
async fn kube_inject_gives_the_webhooks_pod_and_init_applies_its_annotations() {
    let injector = start(&[]).await;
    let mut pod = pod();
    pod["metadata"]["annotations"] = json!({
        "traffic.sidecar.istio.io/includeInboundPorts": "9080",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,169.254.169.254/32",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "3306",
    });
    let (_, by_webhook) = injector.review(&pod).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    let out = run_ok("meshctl", &["kube-inject", "-f", file.to_str().unwrap()]);
    let by_kube_inject: Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(by_kube_inject, by_webhook);

    // The init container's own arguments, given to `proxy init`.
    let init = container(&by_webhook, "initContainers", "istio-init");
    let mut args = strings(&init["args"]);
    assert_eq!(args[0], "init");
    args.push("--dry-run");
    let rules = run_ok("proxy", &args);
    for rule in [
        "-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ] {
        assert!(rules.lines().any(|l| l == rule), "{rule} not in\n{rules}");
    }
    let everything = "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT";
    assert!(
        !rules.lines().any(|l| l == everything),
        "only 9080 comes in"
    );
}

#[tokio::test]
async fn an_edited_config_applies_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("injector.yaml");
    let default = sidecar_injector::config::DEFAULT;
    std::fs::write(&path, default).unwrap();
    let injector = start(&["--config", path.to_str().unwrap()]).await;
    let image = |pod: &Value| container(pod, "containers", "istio-proxy")["image"].clone();
    let (_, before) = injector.review(&pod()).await;
    assert_eq!(image(&before), "ghcr.io/mesh-rs/proxy:0.1.0");

    let edited = default.replace("tag: 0.1.0", "tag: 0.2.0");
    std::fs::write(&path, &edited).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, after) = injector.review(&pod()).await;
        if image(&after) == "ghcr.io/mesh-rs/proxy:0.2.0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edit never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // A template that does not compile: reported, and the last good one stays.
    let broken = edited.replace("template: |\n", "template: |\n  {% if %}\n");
    assert_ne!(broken, edited);
    std::fs::write(&path, broken).unwrap();
    let (_, page) = wait_for_http(injector.admin, "/debug/injector", |_, body| {
        body.contains("last_error\":\"")
    })
    .await;
    assert!(page.contains("template"), "{page}");
    let (response, after) = injector.review(&pod()).await;
    assert_eq!(response["allowed"], true);
    assert_eq!(image(&after), "ghcr.io/mesh-rs/proxy:0.2.0");
}

#[tokio::test]
async fn a_pod_the_template_fails_for_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("injector.yaml");
    // Compiles, but reads a field pods do not have.
    let config = "policy: enabled\ntemplate: |\n  containers: [{name: x, image: {{ pod.spec.image.name }}}]\n";
    std::fs::write(&path, config).unwrap();
    let injector = start(&["--config", path.to_str().unwrap()]).await;
    let (response, stored) = injector.review(&pod()).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("sidecar injection failed: the injection template failed"),
        "{message}"
    );
    assert_eq!(stored, pod(), "no patch");
}

#[tokio::test]
async fn the_injector_keeps_its_webhook_configurations_ca_bundle_set() {
    let (api, api_addr) = testkit::fake_kube::FakeApi::start().await;
    let path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/istio-sidecar-injector";
    api.put(
        path,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "istio-sidecar-injector", "resourceVersion": "7"},
            "webhooks": [{
                "name": "sidecar-injector.istio.io",
                "clientConfig": {"service": {"name": "istio-sidecar-injector", "namespace": "istio-system", "path": "/inject"}},
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }],
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let (kubeconfig, root) = (
        dir.path().join("kubeconfig"),
        dir.path().join("root-cert.pem"),
    );
    std::fs::write(
        &kubeconfig,
        testkit::fake_kube::FakeApi::kubeconfig(api_addr),
    )
    .unwrap();
    std::fs::write(&root, "first root\n").unwrap();
    let _injector = start(&[
        "--webhook-config-name",
        "istio-sidecar-injector",
        "--webhook-ca",
        root.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    let bundle = |pem: &str| json!(base64::engine::general_purpose::STANDARD.encode(pem));
    let holds = |pem: &str| {
        let expected = bundle(pem);
        let api = api.clone();
        async move {
            let deadline = std::time::Instant::now() + WAIT;
            loop {
                let object = api.object(path).unwrap();
                if object["webhooks"][0]["clientConfig"]["caBundle"] == expected {
                    return object;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "caBundle never set: {object}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let object = holds("first root\n").await;
    assert_eq!(object["webhooks"][0]["name"], "sidecar-injector.istio.io");

    // Citadel rotates the root: the bundle follows.
    std::fs::write(&root, "second root\n").unwrap();
    holds("second root\n").await;
    let patches = api
        .writes()
        .iter()
        .filter(|(verb, _)| verb == "patch")
        .count();
    assert_eq!(patches, 2);
}

#[tokio::test]
async fn a_pod_asking_for_the_gateway_template_gets_the_proxy_as_a_router() {
    let injector = start(&[]).await;
    let mut gateway = pod();
    gateway["metadata"]["annotations"] = json!({"inject.istio.io/templates": "gateway"});
    let (response, injected) = injector.review(&gateway).await;
    assert_eq!(response["allowed"], true);
    // No traffic capture: a gateway is reached at its own ports.
    assert_eq!(names(&injected, "initContainers"), Vec::<String>::new());
    let proxy = container(&injected, "containers", "istio-proxy");
    let args = strings(&proxy["args"]);
    assert!(args.contains(&"--type=router"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--interception")),
        "{args:?}"
    );
    // The proxy takes these flags.
    run_ok("proxy", &[&args[..], &["--help"]].concat());
    assert!(injector.proc.terminate().await.success());
}
