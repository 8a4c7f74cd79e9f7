//! The sidecar injector: the mutating admission webhook ([`webhook`]) that
//! adds the proxy and its init container to pods, by the rules and the
//! template of its config ([`config`], [`inject`]); the same injection
//! runs offline in `meshctl kube-inject` ([`kube_inject`]).

pub mod config;
pub mod inject;
pub mod kube_inject;
pub mod webhook;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::serve::Listener;
use clap::Args;
use component::{
    Admin, CancellationToken,
    tls::{TlsFiles, TlsListener},
    watch::Changes,
};
use mesh_kube::webhook_ca::{WebhookCaArgs, WebhookKind};
use tokio::sync::watch;

use crate::{config::Config, inject::Injector};

#[derive(Debug, Clone, Args)]
pub struct InjectorArgs {
    /// Where the webhook serves HTTPS.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::INJECTOR_WEBHOOK)))]
    pub webhook_addr: SocketAddr,
    /// PEM certificate chain of the webhook (watched; reloaded on change).
    #[arg(long)]
    pub webhook_cert: PathBuf,
    /// PEM private key of the webhook (watched; reloaded on change).
    #[arg(long)]
    pub webhook_key: PathBuf,
    /// The injector config: policy, selectors, values and template
    /// (watched; a change that does not parse is refused and logged).
    /// The built-in default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub webhook_ca: WebhookCaArgs,
    /// Kubeconfig for `--webhook-config-name` (default: in-cluster, then
    /// ~/.kube/config).
    #[arg(long, requires = "webhook_config_name")]
    pub kubeconfig: Option<PathBuf>,
}

/// Loads the injector config from `path`, or the built-in default.
pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Injector> {
    let config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
            Config::parse(&text, &path.display().to_string())?
        }
        None => Config::parse(config::DEFAULT, "the built-in config")?,
    };
    Injector::new(config)
}

/// Serves the webhook until `shutdown`.
pub async fn run(
    args: InjectorArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    component::trace::init("sidecar-injector")?;
    let (injector_tx, injector) = watch::channel(Arc::new(load(args.config.as_deref())?));
    let metrics = webhook::Metrics::new(&mut admin.registry());
    let status = Arc::new(std::sync::Mutex::new(None::<String>));
    {
        let (injector, status) = (injector.clone(), status.clone());
        admin.debug_page("injector", move || {
            serde_json::json!({
                "version": injector.borrow().version(),
                "last_error": *status.lock().unwrap_or_else(|e| e.into_inner()),
            })
        });
    }
    if let Some(path) = args.config.clone() {
        let mut changes = Changes::file(&path)?;
        tokio::spawn(async move {
            while changes.next().await.is_some() {
                let outcome = load(Some(&path));
                let mut last_error = status.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(next) => {
                        tracing::info!(version = next.version(), "injector config reloaded");
                        injector_tx.send_replace(Arc::new(next));
                        *last_error = None;
                    }
                    Err(e) => {
                        tracing::error!(
                            "injector config not reloaded, the last good one stays: {e:#}"
                        );
                        *last_error = Some(format!("{e:#}"));
                    }
                }
            }
        });
    }
    if let Some(target) = args.webhook_ca.target(WebhookKind::Mutating) {
        let client = mesh_kube::client(args.kubeconfig.as_deref()).await?;
        tokio::spawn(target.keep(client, shutdown.clone()));
    }
    let tcp = component::cli::bind("webhook-addr", args.webhook_addr).await?;
    let files = TlsFiles::https(args.webhook_cert, args.webhook_key);
    let listener = TlsListener::new(tcp, files, shutdown.clone())?;
    tracing::info!(addr = %listener.local_addr()?, "sidecar injector webhook listening");
    axum::serve(listener, webhook::router(injector, metrics))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
