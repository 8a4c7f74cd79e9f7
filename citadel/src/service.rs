//! The CA's gRPC API, Istio 1.1's `istio.v1.auth`: `CreateCertificate`
//! and the older `HandleCSR`, over the same CA and authentication.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use component::Admin;
use mesh_api::pb::istio::v1::auth::{
    CsrRequest, CsrResponse, IstioCertificateRequest, IstioCertificateResponse,
    istio_ca_service_server::{IstioCaService, IstioCaServiceServer},
    istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
};
use tonic::{Request, Response, Status};

use crate::{
    auth::Tokens,
    ca::{Ca, SignError},
    identity::Identity,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    reason: &'static str,
}

#[derive(Clone)]
struct Metrics {
    issued: Counter,
    refused: Family<Refusal, Counter>,
    signing_seconds: Histogram,
}

impl Metrics {
    fn register(admin: &Admin, ca: &Ca) -> Self {
        let metrics = Self {
            issued: Counter::default(),
            refused: Family::default(),
            signing_seconds: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        };
        let root_expiry = Gauge::<i64>::default();
        let expiry = ca
            .root_not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        root_expiry.set(expiry.as_secs() as i64);
        let mut registry = admin.registry();
        registry.register(
            "certificates_issued",
            "Certificates signed and returned",
            metrics.issued.clone(),
        );
        registry.register(
            "certificate_requests_refused",
            "Certificate requests refused, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "certificate_signing_seconds",
            "Time to verify a CSR and sign its certificate",
            metrics.signing_seconds.clone(),
        );
        registry.register(
            "root_cert_expiry_timestamp_seconds",
            "When the root certificate expires, in seconds since the Unix epoch",
            root_expiry,
        );
        metrics
    }

    fn refused(&self, reason: &'static str, status: Status) -> Status {
        self.refused.get_or_create(&Refusal { reason }).inc();
        status
    }
}

/// Both CA services over one CA.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<Ca>,
    tokens: Arc<Tokens>,
    metrics: Metrics,
}

impl CaService {
    pub fn new(ca: Arc<Ca>, tokens: Tokens, admin: &Admin) -> Self {
        let metrics = Metrics::register(admin, &ca);
        Self {
            ca,
            tokens: Arc::new(tokens),
            metrics,
        }
    }

    pub fn certificate_service(&self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self.clone())
    }

    pub fn ca_service(&self) -> IstioCaServiceServer<Self> {
        IstioCaServiceServer::new(self.clone())
    }

    /// The caller: by its client certificate when it presents one (a
    /// renewal), else by its bootstrap token.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        match request.peer_certs() {
            Some(chain) if !chain.is_empty() => self.ca.verify_client(&chain).map_err(|reason| {
                self.metrics
                    .refused("bad_client_certificate", Status::unauthenticated(reason))
            }),
            _ => self
                .tokens
                .authenticate(request.metadata())
                .await
                .map_err(|s| self.metrics.refused("unauthenticated", s)),
        }
    }

    /// Signs for `caller`; the chain, leaf first.
    fn sign(
        &self,
        csr: &str,
        caller: &Identity,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, Status> {
        let started = Instant::now();
        let chain = self.ca.sign(csr, caller, ttl).map_err(|e| {
            let (reason, status) = match &e {
                SignError::MalformedCsr(_) => {
                    ("malformed_csr", Status::invalid_argument(e.to_string()))
                }
                SignError::OtherIdentity { .. } => {
                    ("other_identity", Status::permission_denied(e.to_string()))
                }
                SignError::TtlTooLong { .. } => {
                    ("ttl_too_long", Status::invalid_argument(e.to_string()))
                }
                SignError::Signing(_) => ("signing_failed", Status::internal(e.to_string())),
            };
            tracing::info!(%caller, error = %e, "certificate refused");
            self.metrics.refused(reason, status)
        })?;
        self.metrics
            .signing_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.issued.inc();
        tracing::debug!(%caller, "certificate issued");
        Ok(chain)
    }

    fn ttl_from(
        &self,
        value: i64,
        unit: Duration,
        field: &str,
    ) -> Result<Option<Duration>, Status> {
        match u32::try_from(value) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(unit * n)),
            Err(_) if value < 0 => Err(self.metrics.refused(
                "bad_ttl",
                Status::invalid_argument(format!("{field} is negative: {value}")),
            )),
            Err(_) => Err(self.metrics.refused(
                "ttl_too_long",
                Status::invalid_argument(format!(
                    "{field} {value} is over the maximum {:?}",
                    self.ca.max_ttl()
                )),
            )),
        }
    }
}

/// The span of one signing, in the caller's trace when it names one.
fn signing_span<T>(request: &Request<T>, caller: &Identity) -> opentelemetry::Context {
    component::trace::span(
        "citadel",
        "citadel sign",
        component::trace::of_metadata(request.metadata()).as_ref(),
        None,
        vec![opentelemetry::KeyValue::new(
            "citadel.identity",
            caller.to_string(),
        )],
    )
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let span = signing_span(&request, &caller);
        let request = request.into_inner();
        if !request.subject_id.is_empty() && request.subject_id != caller.to_string() {
            return Err(self.metrics.refused(
                "other_identity",
                Status::permission_denied(format!(
                    "subject_id {:?} is not the caller, {caller}",
                    request.subject_id
                )),
            ));
        }
        let ttl = self.ttl_from(
            request.validity_duration,
            Duration::from_secs(1),
            "validity_duration",
        )?;
        let signed = self.sign(&request.csr, &caller, ttl);
        component::trace::end(
            &span,
            signed.as_ref().err().map(|e| e.message().to_string()),
        );
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: signed?,
        }))
    }
}

#[tonic::async_trait]
impl IstioCaService for CaService {
    async fn handle_csr(
        &self,
        request: Request<CsrRequest>,
    ) -> Result<Response<CsrResponse>, Status> {
        let caller = self.authenticate(&request).await?;
        let span = signing_span(&request, &caller);
        let request = request.into_inner();
        let csr = String::from_utf8(request.csr_pem).map_err(|_| {
            self.metrics.refused(
                "malformed_csr",
                Status::invalid_argument("malformed CSR: csr_pem is not UTF-8 PEM"),
            )
        })?;
        let ttl = self.ttl_from(
            request.requested_ttl_minutes.into(),
            Duration::from_secs(60),
            "requested_ttl_minutes",
        )?;
        let signed = self.sign(&csr, &caller, ttl);
        component::trace::end(
            &span,
            signed.as_ref().err().map(|e| e.message().to_string()),
        );
        let mut chain = signed?.into_iter();
        let signed_cert = chain.next().unwrap_or_default();
        Ok(Response::new(CsrResponse {
            is_approved: true,
            status: None,
            signed_cert: signed_cert.into_bytes(),
            cert_chain: chain.collect::<String>().into_bytes(),
        }))
    }
}
