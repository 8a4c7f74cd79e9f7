//! The agent part of the proxy: the workload's key and certificate from
//! Citadel. A key is generated in memory (it never leaves the process),
//! a CSR for the workload's SPIFFE identity sent to Citadel's
//! `CreateCertificate`, authenticated by a token the first time and by the
//! certificate itself on renewal (falling back to the token), and the
//! result published to the TLS code, which builds every new handshake from
//! the latest. Renewal starts at half the certificate's life; failures are
//! retried with backoff while the current certificate still serves, so
//! connections are never dropped for a renewal.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use clap::Args;
use component::{Backoff, CancellationToken, readiness::Condition, spiffe::Identity};
use mesh_api::pb::istio::v1::auth::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Citadel's CA address; without it the proxy has no certificate and
    /// refuses mesh TLS.
    #[arg(long, env = "CA_ADDR")]
    pub citadel: Option<String>,
    /// The mesh root, to trust Citadel's serving certificate.
    #[arg(long, env = "CA_ROOT_CERT")]
    pub citadel_root: Option<PathBuf>,
    /// A file holding the bearer token Citadel authenticates the workload by
    /// (its service account token on Kubernetes).
    #[arg(long, env = "CA_TOKEN_FILE")]
    pub citadel_token_file: Option<PathBuf>,
    /// The host name Citadel's serving certificate carries.
    #[arg(long, default_value = "istio-citadel")]
    pub citadel_hostname: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Certificate lifetime asked for; Citadel caps it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub cert_ttl: Duration,
    /// Also write each certificate, as Istio 1.1 mounts them at
    /// `/etc/certs` (`cert-chain.pem`, `key.pem`, `root-cert.pem`), for
    /// config that names those files (a gateway's MUTUAL server with the
    /// workload's own certificate).
    #[arg(long)]
    pub certs_dir: Option<PathBuf>,
}

/// The workload's certificate chain (leaf first), its key, and the root.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub root: CertificateDer<'static>,
    pub identity: Identity,
    pub not_after: SystemTime,
    /// PEM forms, for the client certificate on renewal.
    chain_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Writes the chain, key and root into `dir` as Istio's files, each
    /// replaced in one rename.
    fn write(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(self.root.as_ref());
        let mut root = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            root.push_str(&String::from_utf8_lossy(line));
            root.push('\n');
        }
        root.push_str("-----END CERTIFICATE-----\n");
        std::fs::create_dir_all(dir)?;
        for (name, text) in [
            ("key.pem", self.key_pem.as_str()),
            ("cert-chain.pem", self.chain_pem.as_str()),
            ("root-cert.pem", root.as_str()),
        ] {
            let next = dir.join(format!(".{name}.next"));
            std::fs::write(&next, text)?;
            std::fs::rename(&next, dir.join(name))?;
        }
        Ok(())
    }
}

pub type CredentialsWatch = watch::Receiver<Option<Arc<Credentials>>>;

pub struct Agent {
    args: AgentArgs,
    identity: Identity,
    credentials: watch::Sender<Option<Arc<Credentials>>>,
    ready: Condition,
    issued: Counter,
    expiry: Gauge,
}

impl Agent {
    pub fn new(
        args: AgentArgs,
        namespace: &str,
        service_account: &str,
        ready: Condition,
        registry: &mut Registry,
    ) -> (Self, CredentialsWatch) {
        let identity = Identity::new(&args.trust_domain, namespace, service_account);
        let (issued, expiry) = (Counter::default(), Gauge::default());
        registry.register(
            "certificates_issued",
            "Certificates taken from Citadel: the first, and each renewal",
            issued.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "When the certificate held expires, in seconds since 1970",
            expiry.clone(),
        );
        let (credentials, watch) = watch::channel(None);
        // Without Citadel there is nothing to wait for.
        ready.set(args.citadel.is_none());
        (
            Self {
                args,
                identity,
                credentials,
                ready,
                issued,
                expiry,
            },
            watch,
        )
    }

    /// Keeps a valid certificate until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Some(citadel) = self.args.citadel.clone() else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut due = SystemTime::now();
        loop {
            let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let current = self.credentials.borrow().clone();
            match self.request(&citadel, current.as_deref()).await {
                Ok(credentials) => {
                    tracing::info!(identity = %credentials.identity, expires = %humantime::format_rfc3339_seconds(credentials.not_after), "certificate from Citadel");
                    due = half_life(credentials.not_after);
                    self.issued.inc();
                    let expiry = credentials.not_after.duration_since(SystemTime::UNIX_EPOCH);
                    self.expiry.set(expiry.map_or(0, |d| d.as_secs() as i64));
                    if let Some(dir) = &self.args.certs_dir
                        && let Err(e) = credentials.write(dir)
                    {
                        tracing::warn!(dir = %dir.display(), "certificate not written: {e}");
                    }
                    self.credentials.send_replace(Some(Arc::new(credentials)));
                    self.ready.set(true);
                    backoff.reset();
                }
                Err(e) => {
                    // The current certificate, if any, serves meanwhile.
                    tracing::warn!(%citadel, "no certificate from Citadel: {e:#}");
                    due = SystemTime::now() + backoff.next_delay();
                }
            }
        }
    }

    async fn request(
        &self,
        citadel: &str,
        current: Option<&Credentials>,
    ) -> anyhow::Result<Credentials> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(self.identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let root_file = self
            .args
            .citadel_root
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("--citadel-root is needed to trust Citadel"))?;
        let root_pem = std::fs::read_to_string(root_file)
            .map_err(|e| anyhow::anyhow!("--citadel-root {}: {e}", root_file.display()))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&root_pem))
            .domain_name(self.args.citadel_hostname.clone());
        // Renewal proves the identity with the certificate held, while it
        // is valid; otherwise the token does.
        let held = current.filter(|c| c.not_after > SystemTime::now());
        if let Some(c) = held {
            tls = tls.identity(TlsIdentity::from_pem(&c.chain_pem, &c.key_pem));
        }
        let channel = Endpoint::from_shared(format!("https://{citadel}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.args.cert_ttl.as_secs() as i64,
            ..Default::default()
        });
        if held.is_none()
            && let Some(file) = &self.args.citadel_token_file
        {
            let token = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--citadel-token-file {}: {e}", file.display()))?;
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {}", token.trim()).parse()?);
        }
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await?
            .into_inner();
        let credentials = Credentials::issued(&response.cert_chain, &key)?;
        anyhow::ensure!(
            credentials.identity == self.identity,
            "Citadel issued {}, not {}",
            credentials.identity,
            self.identity
        );
        Ok(credentials)
    }
}

impl Credentials {
    /// The credentials of a chain Citadel issued (PEM, leaf first, root
    /// last) for `key`.
    pub fn issued(cert_chain: &[String], key: &rcgen::KeyPair) -> anyhow::Result<Self> {
        let chain_pem = cert_chain.concat();
        let ders: Vec<CertificateDer<'static>> = cert_chain
            .iter()
            .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Vec<_>>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("Citadel's chain does not parse: {e}"))?;
        let (root, chain) = ders
            .split_last()
            .ok_or_else(|| anyhow::anyhow!("Citadel answered with an empty chain"))?;
        let identity = component::spiffe::identity_of(&chain[0]).map_err(anyhow::Error::msg)?;
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
            .map_err(|e| anyhow::anyhow!("the issued certificate does not parse: {e}"))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64);
        let key_der = key.serialize_der();
        Ok(Credentials {
            chain: chain.to_vec(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            root: root.clone(),
            identity,
            not_after,
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

/// When to renew: halfway from now to expiry as first seen, so a 24 h
/// certificate is renewed with 12 h to spare.
fn half_life(not_after: SystemTime) -> SystemTime {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    SystemTime::now() + left / 2
}
