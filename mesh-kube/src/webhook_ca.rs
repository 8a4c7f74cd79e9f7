//! Keeps an admission webhook configuration's `caBundle` equal to the
//! root that the webhook's serving certificate chains to, as Istio 1.1's
//! Galley and injector do. Citadel issues those certificates (with the
//! Service's DNS name) into the component's secret, next to the root, so
//! only the running component knows which root the API server must trust.
//! The bundle is set at start and again whenever the root file changes.

use std::{path::PathBuf, time::Duration};

use base64::Engine;
use json_patch::{AddOperation, Patch, PatchOperation, TestOperation, jsonptr::PointerBuf};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PatchParams},
};
use serde_json::Value;

use component::{CancellationToken, backoff::Backoff, watch::Changes};

/// How often a configuration set already is looked at again.
const RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookKind {
    Mutating,
    Validating,
}

/// The flags that ask for it.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookCaArgs {
    /// The webhook configuration whose `caBundle` this component keeps
    /// set to `--webhook-ca` (in Kubernetes; needs get and patch on it).
    #[arg(long, requires = "webhook_ca")]
    pub webhook_config_name: Option<String>,
    /// The root the webhook's certificate chains to (PEM; watched).
    #[arg(long, requires = "webhook_config_name")]
    pub webhook_ca: Option<PathBuf>,
}

impl WebhookCaArgs {
    pub fn target(&self, kind: WebhookKind) -> Option<WebhookCa> {
        Some(WebhookCa {
            kind,
            name: self.webhook_config_name.clone()?,
            ca_file: self.webhook_ca.clone()?,
        })
    }
}

/// Which configuration to keep, and the root file it must trust.
#[derive(Debug, Clone)]
pub struct WebhookCa {
    pub kind: WebhookKind,
    pub name: String,
    pub ca_file: PathBuf,
}

impl WebhookCa {
    fn api(&self, client: kube::Client) -> Api<DynamicObject> {
        let plural = match self.kind {
            WebhookKind::Mutating => "mutatingwebhookconfigurations",
            WebhookKind::Validating => "validatingwebhookconfigurations",
        };
        let kind = match self.kind {
            WebhookKind::Mutating => "MutatingWebhookConfiguration",
            WebhookKind::Validating => "ValidatingWebhookConfiguration",
        };
        let resource = ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        Api::all_with(client, &resource)
    }

    /// Sets every webhook's `caBundle` to the root file's PEM; `Ok(false)`
    /// when they held it already.
    async fn apply(&self, api: &Api<DynamicObject>) -> anyhow::Result<bool> {
        let pem = std::fs::read(&self.ca_file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.ca_file.display()))?;
        let bundle = Value::String(base64::engine::general_purpose::STANDARD.encode(pem));
        let config = api.get(&self.name).await?;
        let webhooks = config.data["webhooks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut ops = Vec::new();
        for (i, webhook) in webhooks.iter().enumerate() {
            if webhook["clientConfig"]["caBundle"] == bundle {
                continue;
            }
            let index = i.to_string();
            // The index still names the same webhook, or nothing is patched.
            ops.push(PatchOperation::Test(TestOperation {
                path: PointerBuf::from_tokens(["webhooks", &index, "name"]),
                value: webhook["name"].clone(),
            }));
            ops.push(PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(["webhooks", &index, "clientConfig", "caBundle"]),
                value: bundle.clone(),
            }));
        }
        if ops.is_empty() {
            return Ok(false);
        }
        let patch = kube::api::Patch::Json::<()>(Patch(ops));
        api.patch(&self.name, &PatchParams::default(), &patch)
            .await?;
        Ok(true)
    }

    /// Keeps the bundle set until `shutdown`; failures (the configuration
    /// not created yet, the API server away) are retried with backoff.
    pub async fn keep(
        self,
        client: kube::Client,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let api = self.api(client);
        let mut changes = Changes::file(&self.ca_file)?;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match self.apply(&api).await {
                Ok(changed) => {
                    backoff.reset();
                    if changed {
                        tracing::info!(config = %self.name, "webhook caBundle set");
                    }
                    // Checked again now and then: someone may have
                    // replaced the configuration without it.
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        next = changes.next() => if next.is_none() { return Ok(()) },
                        _ = tokio::time::sleep(RECHECK) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(config = %self.name, "webhook caBundle not set: {e:#}");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = backoff.wait() => {}
                    }
                }
            }
        }
    }
}
