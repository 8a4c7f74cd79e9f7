//! Galley's validating admission webhook over real HTTPS, with
//! AdmissionReview JSON in the shape the Kubernetes API server sends.

use serde_json::{Value, json};
use testkit::*;

const REVIEW: &str = include_str!("data/admission-review.json");

fn review_of(spec: Value) -> Value {
    let mut review: Value = serde_json::from_str(REVIEW).unwrap();
    review["request"]["object"]["spec"] = spec;
    review
}

#[tokio::test]
async fn webhook_allows_valid_and_denies_invalid_virtual_services() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path, cert) = webhook_certificate(certs.path());
    let webhook = free_addr();
    let webhook_arg = webhook.to_string();
    let flags = [
        "--webhook-addr",
        &webhook_arg,
        "--webhook-cert",
        cert_path.to_str().unwrap(),
        "--webhook-key",
        key_path.to_str().unwrap(),
    ];
    let galley = Galley::start(dir.path(), &flags).await.proc;
    let client = https_client(&cert);
    let post = |review: Value| {
        let client = client.clone();
        async move {
            let response = client
                .post(format!("https://{webhook}/admitpilot"))
                .header("content-type", "application/json")
                .body(review.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            serde_json::from_str::<Value>(&response.text().await.unwrap()).unwrap()
        }
    };

    let valid = post(review_of(json!({
        "hosts": ["reviews.shop.svc.cluster.local"],
        "http": [{"route": [{"destination": {"host": "reviews.shop.svc.cluster.local", "subset": "v1"}}]}]
    })))
    .await;
    assert_eq!(valid["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(valid["kind"], "AdmissionReview");
    assert_eq!(
        valid["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(valid["response"]["allowed"], true);

    let invalid = post(review_of(json!({
        "hosts": ["reviews.shop.svc.cluster.local"],
        "http": [{"route": [
            {"destination": {"host": "reviews"}, "weight": 50},
            {"destination": {"host": "ratings"}, "weight": 20}
        ]}]
    })))
    .await;
    assert_eq!(invalid["response"]["allowed"], false);
    let message = invalid["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.http[0].route: destination weights add up to 70, not 100"),
        "{message}"
    );

    let schema = post(review_of(json!({"hosts": ["a"], "htp": []}))).await;
    assert_eq!(schema["response"]["allowed"], false);
    assert!(
        schema["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("htp"),
        "{schema}"
    );

    // Not an Istio kind: not Galley's to judge.
    let mut other = review_of(json!({}));
    other["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    assert_eq!(post(other).await["response"]["allowed"], true);

    assert!(galley.terminate().await.success());
}
