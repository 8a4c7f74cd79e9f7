//! The validating admission webhook: Kubernetes sends an
//! `admission.k8s.io/v1` AdmissionReview over HTTPS for every Istio resource
//! being created or updated; an invalid one is denied with the same message
//! `meshctl validate` and the directory source give. Kinds that are not
//! Istio's, and deletions, are allowed.

use std::{net::SocketAddr, path::PathBuf};

use axum::{Json, Router, http::StatusCode, routing::post, serve::Listener};
use component::{
    CancellationToken,
    tls::{TlsFiles, TlsListener},
};
use kube_core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use mesh_api::{kinds, object::ConfigObject};

use crate::validation;

/// Istio 1.1's paths for the two halves of its config, and a generic one.
const PATHS: &[&str] = &["/validate", "/admitpilot", "/admitmixer"];

pub fn router() -> Router {
    PATHS.iter().fold(Router::new(), |router, path| {
        router.route(path, post(review))
    })
}

/// Binds the webhook's address and loads its certificate (so that a bad
/// flag fails at start), and returns the future that serves HTTPS until
/// `shutdown`.
pub async fn bind(
    addr: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<impl Future<Output = std::io::Result<()>>> {
    let tcp = component::cli::bind("webhook-addr", addr).await?;
    let listener = TlsListener::new(tcp, TlsFiles::https(cert, key), shutdown.clone())?;
    tracing::info!(addr = %listener.local_addr()?, "galley validating webhook listening");
    Ok(axum::serve(listener, router())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .into_future())
}

async fn review(
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Result<Json<AdmissionReview<DynamicObject>>, (StatusCode, String)> {
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "an AdmissionReview without a request\n".to_string(),
        )
    })?;
    let response = match verdict(&request) {
        Ok(warnings) if warnings.is_empty() => AdmissionResponse::from(&request),
        // kubectl shows these to whoever applied the object.
        Ok(warnings) => {
            let mut response = AdmissionResponse::from(&request);
            response.warnings = Some(warnings);
            response
        }
        Err(reason) => {
            tracing::info!(kind = %request.kind.kind, name = %request.name, namespace = ?request.namespace, %reason, "denied");
            AdmissionResponse::from(&request).deny(reason)
        }
    };
    Ok(Json(response.into_review()))
}

/// `Err(reason)` when the object must be refused, else the warnings it
/// is admitted with.
fn verdict(request: &AdmissionRequest<DynamicObject>) -> Result<Vec<String>, String> {
    if matches!(request.operation, Operation::Delete | Operation::Connect) {
        return Ok(Vec::new());
    }
    let Some(object) = &request.object else {
        return Ok(Vec::new());
    };
    let api_version = if request.kind.group.is_empty() {
        request.kind.version.clone()
    } else {
        format!("{}/{}", request.kind.group, request.kind.version)
    };
    if kinds::by_object_kind(&api_version, &request.kind.kind).is_none() {
        return Ok(Vec::new());
    }
    let json = serde_json::to_value(object).map_err(|e| format!("cannot read the object: {e}"))?;
    let object = ConfigObject::from_json(json, "admission request").map_err(|e| e.to_string())?;
    let (errors, warnings): (Vec<_>, Vec<_>) = validation::validate(&object)
        .into_iter()
        .partition(|p| p.is_error());
    if errors.is_empty() {
        return Ok(warnings.iter().map(ToString::to_string).collect());
    }
    let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    Err(format!("{}: {}", object.location, errors.join("; ")))
}
