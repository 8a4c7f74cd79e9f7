//! Citadel, the mesh's CA: it issues every workload its SPIFFE identity
//! over Istio 1.1's CA API, served over TLS. Callers authenticate by a
//! bootstrap token (local mode) or their service account token (Kubernetes
//! mode), or to renew by the certificate they hold. In Kubernetes mode it
//! also keeps a key-and-cert Secret per ServiceAccount and publishes the
//! root in a ConfigMap.

pub mod auth;
pub mod ca;
pub mod ca_secret;
pub use component::spiffe as identity;
pub mod kube;
pub mod service;
mod tls;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use component::{
    Admin, CancellationToken,
    limits::{GRPC_MESSAGE_BYTES, Limits, ServerLimits},
};
use serde_json::json;

use crate::{
    auth::{BootstrapTokens, Tokens},
    ca::{Ca, CaOptions},
    kube::TokenReviewer,
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
    /// The key of a generated self-signed root.
    #[arg(long, value_enum, default_value_t)]
    pub ca_key_algorithm: ca::KeyAlgorithm,
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
    /// Without it (and without `--kube`) no caller can authenticate.
    #[arg(long, conflicts_with = "kube")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// Kubernetes mode: tokens checked by TokenReview, a secret per
    /// ServiceAccount, the root in a ConfigMap.
    #[arg(long)]
    pub kube: bool,
    /// Kubeconfig file for `--kube` (default: in-cluster, then ~/.kube/config).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the root ConfigMap.
    #[arg(long, default_value = "istio-system")]
    pub namespace: String,
    /// Rotate a secret's certificate once less than this share of its
    /// lifetime is left.
    #[arg(long, default_value_t = 0.5)]
    pub secret_grace_ratio: f64,
    /// How often every secret is checked for rotation.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub secret_check_interval: Duration,
    /// A DNS name added to one ServiceAccount's secret certificate, as
    /// `<namespace>/<account>=<name>` (repeatable): the admission webhooks
    /// serve with those certificates, and the API server calls them by
    /// their Service's name.
    #[arg(
        long = "dns-name",
        value_parser = kube::parse_dns_name,
        default_values = [
            "istio-system/istio-galley-service-account=istio-galley.istio-system.svc",
            "istio-system/istio-sidecar-injector-service-account=istio-sidecar-injector.istio-system.svc",
        ]
    )]
    pub dns_names: Vec<kube::DnsName>,
    /// In Kubernetes mode, the Secret (in `--namespace`) that keeps the CA
    /// across restarts: restored into an empty `--ca-dir`, or saved there
    /// after a root is generated. Empty for none.
    #[arg(long, default_value = "istio-ca-secret")]
    pub ca_secret: String,
    /// Bounds of the CA API (`citadel_ca_limit_reached_total`).
    #[command(flatten)]
    pub server_limits: ServerLimits,
}

/// Loads (or creates) the CA and serves its API until `shutdown`.
pub async fn run(
    args: CitadelArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    component::trace::init("citadel")?;
    let listener = component::cli::bind("grpc-addr", args.grpc_addr).await?;
    run_on(listener, args, admin, shutdown).await
}

/// [`run`] on a listener already bound (`--grpc-addr` is not used).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    args: CitadelArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let kube = match args.kube {
        true => Some(mesh_kube::client(args.kubeconfig.as_deref()).await?),
        false => None,
    };
    let keep_ca = kube.as_ref().filter(|_| !args.ca_secret.is_empty());
    let restored = match keep_ca {
        Some(client) => {
            ca_secret::restore(client, &args.namespace, &args.ca_secret, &args.ca_dir).await?
        }
        None => false,
    };
    let citadel = Citadel::load(&args, &admin, kube.clone())?;
    if let Some(client) = keep_ca
        && !restored
    {
        ca_secret::save(client, &args.namespace, &args.ca_secret, &args.ca_dir).await?;
    }
    let Some(client) = kube else {
        return citadel.serve(listener, &admin, shutdown).await;
    };
    let secrets = kube::SecretController::new(
        client,
        citadel.ca.clone(),
        kube::SecretOptions {
            ttl: args.workload_cert_ttl,
            grace_ratio: args.secret_grace_ratio,
            check_interval: args.secret_check_interval,
            dns_names: args.dns_names.clone(),
        },
        &mut admin.registry(),
    );
    tokio::try_join!(
        citadel.serve(listener, &admin, shutdown.clone()),
        secrets.run(&args.namespace, shutdown.clone()),
    )?;
    Ok(())
}

/// A loaded CA, ready to serve.
pub struct Citadel {
    ca: Arc<Ca>,
    limits: Limits,
    service: CaService,
    ca_dir: PathBuf,
    hostnames: Vec<String>,
    serving_lifetime: Duration,
}

impl Citadel {
    /// Loads the CA from `--ca-dir`, generating a self-signed one there
    /// first when allowed and absent, and the bootstrap tokens; registers
    /// the metrics and the `/debug/root` page.
    pub fn load(
        args: &CitadelArgs,
        admin: &Admin,
        kube: Option<::kube::Client>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..1.0).contains(&args.secret_grace_ratio),
            "--secret-grace-ratio {} is not in [0, 1)",
            args.secret_grace_ratio
        );
        anyhow::ensure!(
            args.workload_cert_ttl <= args.max_workload_cert_ttl,
            "--workload-cert-ttl {:?} is over --max-workload-cert-ttl {:?}",
            args.workload_cert_ttl,
            args.max_workload_cert_ttl
        );
        let ca = Arc::new(Ca::load_or_create(&CaOptions {
            dir: args.ca_dir.clone(),
            self_signed: args.self_signed_ca,
            key_algorithm: args.ca_key_algorithm,
            trust_domain: args.trust_domain.clone(),
            root_ttl: args.self_signed_ca_cert_ttl,
            default_ttl: args.workload_cert_ttl,
            max_ttl: args.max_workload_cert_ttl,
        })?);
        let tokens = match (kube, &args.bootstrap_tokens) {
            (Some(client), _) => {
                Tokens::Kube(Box::new(TokenReviewer::new(client, &args.trust_domain)))
            }
            (None, Some(path)) => {
                Tokens::Bootstrap(BootstrapTokens::load(path, &args.trust_domain)?)
            }
            (None, None) => {
                tracing::warn!("no --bootstrap-tokens: every certificate request will be refused");
                Tokens::Bootstrap(BootstrapTokens::default())
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
        let limits = Limits::new(&args.server_limits, "ca", &mut admin.registry());
        Ok(Self {
            limits,
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
        )?
        .with_limits(self.limits.clone());
        admin.readiness().condition("serving").set(true);
        let max = self.limits.max_message_bytes(GRPC_MESSAGE_BYTES);
        self.limits
            .grpc(tonic::transport::Server::builder())
            .add_service(
                self.service
                    .certificate_service()
                    .max_decoding_message_size(max),
            )
            .add_service(self.service.ca_service().max_decoding_message_size(max))
            .serve_with_incoming_shutdown(tls.into_incoming(), shutdown.cancelled_owned())
            .await?;
        Ok(())
    }
}
