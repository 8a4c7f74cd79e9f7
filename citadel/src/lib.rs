//! Citadel, the mesh's CA: it issues every workload its SPIFFE identity
//! over Istio 1.1's CA API, served over TLS. Callers authenticate by a
//! bootstrap token, or to renew by the certificate they hold. Kubernetes
//! token review and the secret controller are not built yet.

pub mod auth;
pub mod ca;
pub mod identity;
pub mod service;
mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use component::{Admin, CancellationToken};
use mcp_proto::mcp;
use serde_json::json;

use crate::{
    auth::BootstrapTokens,
    ca::{Ca, CaOptions},
    service::CaService,
};

#[derive(Debug, Clone, Args)]
pub struct CitadelArgs {
    /// Address of the CA's gRPC API.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::CITADEL_CA)))]
    pub grpc_addr: SocketAddr,
    /// Directory of the CA's files (`ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`): plugged-in certificates, or
    /// where a self-signed root is generated and kept.
    #[arg(long, default_value = "citadel-ca")]
    pub ca_dir: PathBuf,
    /// Generate a self-signed root when `--ca-dir` holds no CA.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub self_signed_ca: bool,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of a generated self-signed root.
    #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
    pub self_signed_ca_cert_ttl: Duration,
    /// Lifetime of a workload certificate when the request names none.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub workload_cert_ttl: Duration,
    /// The longest lifetime a request may ask for.
    #[arg(long, default_value = "2160h", value_parser = humantime::parse_duration)]
    pub max_workload_cert_ttl: Duration,
    /// Names clients reach the CA API by, in its serving certificate.
    #[arg(
        long = "grpc-hostname",
        default_values_t = ["istio-citadel".to_string(), "istio-citadel.istio-system.svc".to_string(), "localhost".to_string(), "127.0.0.1".to_string()]
    )]
    pub grpc_hostnames: Vec<String>,
    /// Bootstrap tokens, lines of `<namespace>/<service-account> <token>`.
    /// Without it no caller can authenticate.
    #[arg(long)]
    pub bootstrap_tokens: Option<PathBuf>,
}

/// Loads (or creates) the CA and serves its API until `shutdown`.
pub async fn run(
    args: CitadelArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --grpc-addr {}: {e}", args.grpc_addr))?;
    Citadel::load(&args, &admin)?
        .serve(listener, &admin, shutdown)
        .await
}

/// A loaded CA, ready to serve.
pub struct Citadel {
    ca: Arc<Ca>,
    service: CaService,
    ca_dir: PathBuf,
    hostnames: Vec<String>,
    serving_lifetime: Duration,
}

impl Citadel {
    /// Loads the CA from `--ca-dir`, generating a self-signed one there
    /// first when allowed and absent, and the bootstrap tokens; registers
    /// the metrics and the `/debug/root` page.
    pub fn load(args: &CitadelArgs, admin: &Admin) -> anyhow::Result<Self> {
        anyhow::ensure!(
            args.workload_cert_ttl <= args.max_workload_cert_ttl,
            "--workload-cert-ttl {:?} is over --max-workload-cert-ttl {:?}",
            args.workload_cert_ttl,
            args.max_workload_cert_ttl
        );
        let ca = Arc::new(Ca::load_or_create(&CaOptions {
            dir: args.ca_dir.clone(),
            self_signed: args.self_signed_ca,
            trust_domain: args.trust_domain.clone(),
            root_ttl: args.self_signed_ca_cert_ttl,
            default_ttl: args.workload_cert_ttl,
            max_ttl: args.max_workload_cert_ttl,
        })?);
        let tokens = match &args.bootstrap_tokens {
            Some(path) => BootstrapTokens::load(path, &args.trust_domain)?,
            None => {
                tracing::warn!("no --bootstrap-tokens: every certificate request will be refused");
                BootstrapTokens::default()
            }
        };
        let root = ca.clone();
        admin.debug_page("root", move || {
            json!({
                "root_cert": root.root_pem(),
                "not_after": humantime::format_rfc3339(root.root_not_after()).to_string(),
                "trust_domain": root.trust_domain(),
            })
        });
        Ok(Self {
            service: CaService::new(ca.clone(), tokens, admin),
            ca,
            ca_dir: args.ca_dir.clone(),
            hostnames: args.grpc_hostnames.clone(),
            serving_lifetime: args.workload_cert_ttl,
        })
    }

    /// Serves the CA API over TLS on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        admin: &Admin,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        tracing::info!(
            addr = %listener.local_addr()?,
            dir = %self.ca_dir.display(),
            "citadel serving the CA API"
        );
        let tls = tls::listener(
            listener,
            self.ca,
            self.hostnames,
            self.serving_lifetime,
            shutdown.clone(),
        )?;
        admin.readiness().condition("serving").set(true);
        mcp::grpc_server()
            .add_service(self.service.certificate_service())
            .add_service(self.service.ca_service())
            .serve_with_incoming_shutdown(tls.into_incoming(), shutdown.cancelled_owned())
            .await?;
        Ok(())
    }
}
