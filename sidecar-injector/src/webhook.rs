//! The mutating admission webhook: Kubernetes sends an
//! `admission.k8s.io/v1` AdmissionReview for every pod created in a
//! namespace the MutatingWebhookConfiguration selects; the answer allows
//! the pod with a JSON Patch that adds the sidecar, or unchanged when the
//! rules leave it alone. When injection fails (a template error, a name
//! clash) the pod is refused with the reason rather than let in without
//! the sidecar it asked for: the ReplicaSet retries, and the event says why.

use std::sync::Arc;

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use kube_core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::sync::watch;

use crate::inject::{Injector, Outcome};

/// Istio 1.1's path.
pub const PATH: &str = "/inject";

/// Pods reviewed, by outcome.
#[derive(Clone, Default)]
pub struct Metrics {
    requests: Counter,
    success: Counter,
    skip: Counter,
    failure: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        for (name, help, counter) in [
            (
                "injection_requests",
                "Admission requests for pods",
                &m.requests,
            ),
            ("injection_success", "Pods injected", &m.success),
            ("injection_skip", "Pods the rules left alone", &m.skip),
            (
                "injection_failure",
                "Pods refused because injection failed",
                &m.failure,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        m
    }
}

#[derive(Clone)]
struct Webhook {
    injector: watch::Receiver<Arc<Injector>>,
    metrics: Metrics,
}

pub fn router(injector: watch::Receiver<Arc<Injector>>, metrics: Metrics) -> Router {
    Router::new()
        .route(PATH, post(review))
        .with_state(Webhook { injector, metrics })
}

async fn review(
    State(webhook): State<Webhook>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let answer = answer(&webhook, review)?;
    Ok(Json(with_base64_patch(answer.into_review())))
}

/// The review as JSON, its patch as the API server reads a `[]byte`: a
/// base64 string. kube-core serializes `Vec<u8>` as an array of numbers,
/// which the API server refuses, so every injection would fail
/// (kube-rs/kube#1781; the workaround can go once that is fixed).
fn with_base64_patch(review: AdmissionReview<DynamicObject>) -> serde_json::Value {
    use base64::Engine;
    let patch = review.response.as_ref().and_then(|r| r.patch.clone());
    let mut json = serde_json::to_value(review).expect("an AdmissionReview serializes");
    if let Some(patch) = patch {
        json["response"]["patch"] = base64::engine::general_purpose::STANDARD
            .encode(patch)
            .into();
    }
    json
}

fn answer(
    webhook: &Webhook,
    review: AdmissionReview<DynamicObject>,
) -> Result<AdmissionResponse, (StatusCode, String)> {
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "an AdmissionReview without a request\n".to_string(),
        )
    })?;
    let allowed = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let Some(object) = request.object.as_ref().filter(|_| is_pod) else {
        return Ok(allowed);
    };
    if request.operation != Operation::Create {
        return Ok(allowed);
    }
    webhook.metrics.requests.inc();
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let pod = serde_json::to_value(object).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("the pod cannot be read: {e}\n"),
        )
    })?;
    let name = object
        .metadata
        .name
        .clone()
        .or_else(|| object.metadata.generate_name.clone())
        .unwrap_or_default();
    let injector = webhook.injector.borrow().clone();
    let response = match injector.inject(&pod, &namespace) {
        Ok(Outcome::Injected(patch)) => match allowed.with_patch(patch) {
            Ok(response) => {
                webhook.metrics.success.inc();
                tracing::info!(pod = %name, %namespace, "injected");
                response
            }
            Err(e) => refuse(webhook, &request, &name, &namespace, e.into()),
        },
        Ok(Outcome::Skipped(reason)) => {
            webhook.metrics.skip.inc();
            tracing::debug!(pod = %name, %namespace, reason, "not injected");
            allowed
        }
        Err(e) => refuse(webhook, &request, &name, &namespace, e),
    };
    Ok(response)
}

fn refuse(
    webhook: &Webhook,
    request: &AdmissionRequest<DynamicObject>,
    name: &str,
    namespace: &str,
    error: anyhow::Error,
) -> AdmissionResponse {
    webhook.metrics.failure.inc();
    tracing::warn!(pod = %name, %namespace, "injection failed: {error:#}");
    AdmissionResponse::from(request).deny(format!("sidecar injection failed: {error:#}"))
}
