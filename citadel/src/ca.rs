//! The signing CA. Its files follow Istio's plugged-in convention, whether
//! an operator put them there or Citadel generated them: `ca-cert.pem` and
//! `ca-key.pem` sign, `cert-chain.pem` is the chain from `ca-cert.pem` up
//! towards the root, `root-cert.pem` is the root. A self-signed CA is a
//! root that is also the signing certificate, generated on first start and
//! reused on every start after.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use component::spiffe::{self, Identity, Usage};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// Leaves are valid from a little before they are signed, for peers whose
/// clocks run behind: a minute, or a tenth of a shorter lifetime.
const BACKDATE: Duration = Duration::from_secs(60);

fn backdate(ttl: Duration) -> Duration {
    BACKDATE.min(ttl / 10)
}

/// The key of a generated root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    Rsa2048,
}

impl KeyAlgorithm {
    fn generate(self) -> anyhow::Result<KeyPair> {
        match self {
            Self::EcdsaP256 => Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?),
            Self::Rsa2048 => {
                // `rsa` only generates the key; ring signs with it.
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)?;
                let der = key.to_pkcs8_der()?;
                Ok(KeyPair::from_pkcs8_der_and_sign_algo(
                    &der.as_bytes().into(),
                    &rcgen::PKCS_RSA_SHA256,
                )?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaOptions {
    pub dir: PathBuf,
    /// Generate a root in `dir` when it holds no CA files.
    pub self_signed: bool,
    pub key_algorithm: KeyAlgorithm,
    pub trust_domain: String,
    pub root_ttl: Duration,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("the CSR asks for {asked}, but the caller is {caller}")]
    OtherIdentity { asked: String, caller: Identity },
    #[error("requested TTL {requested:?} is over the maximum {max:?}")]
    TtlTooLong { requested: Duration, max: Duration },
    #[error("signing failed: {0}")]
    Signing(String),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// `ca-cert.pem` up to the root, PEM, root last.
    chain: Vec<String>,
    /// The certificates between a leaf and the root, for verifying clients.
    intermediates: Vec<CertificateDer<'static>>,
    root: String,
    root_der: CertificateDer<'static>,
    root_not_after: SystemTime,
    trust_domain: String,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl Ca {
    /// Loads the CA from `options.dir`, generating a self-signed one first
    /// when the directory holds none and `options.self_signed` allows it.
    pub fn load_or_create(options: &CaOptions) -> anyhow::Result<Self> {
        let dir = &options.dir;
        let present: Vec<&str> = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT]
            .into_iter()
            .filter(|f| dir.join(f).exists())
            .collect();
        if present.is_empty() {
            anyhow::ensure!(
                options.self_signed,
                "{} holds no CA ({CA_CERT}, {CA_KEY}, {CERT_CHAIN}, {ROOT_CERT}) and self-signing is off",
                dir.display()
            );
            create_self_signed(options)?;
            tracing::info!(dir = %dir.display(), "generated a self-signed root CA");
        } else if present.len() < 4 {
            anyhow::bail!(
                "{} holds only {} of {CA_CERT}, {CA_KEY}, {CERT_CHAIN} and {ROOT_CERT}",
                dir.display(),
                present.join(", ")
            );
        }
        Self::load(options)
    }

    fn load(options: &CaOptions) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let path = options.dir.join(name);
            fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        };
        let (ca_cert, ca_key, chain, root) = (
            read(CA_CERT)?,
            read(CA_KEY)?,
            read(CERT_CHAIN)?,
            read(ROOT_CERT)?,
        );
        let in_file = |name: &str| options.dir.join(name).display().to_string();
        let key = KeyPair::from_pem(&ca_key)
            .map_err(|e| anyhow::anyhow!("{}: not a usable private key: {e}", in_file(CA_KEY)))?;
        let ca_der = pem_blocks(&ca_cert, &in_file(CA_CERT))?;
        let ca_der = ca_der.first().expect("pem_blocks returns at least one");
        let (_, parsed) = x509_parser::parse_x509_certificate(ca_der)
            .map_err(|e| anyhow::anyhow!("{}: {e}", in_file(CA_CERT)))?;
        anyhow::ensure!(
            parsed.public_key().raw == key.subject_public_key_info().as_slice(),
            "{} does not hold the key of {}",
            in_file(CA_KEY),
            in_file(CA_CERT)
        );
        anyhow::ensure!(
            parsed.is_ca(),
            "{} is not a CA certificate",
            in_file(CA_CERT)
        );
        let root_der = pem_blocks(&root, &in_file(ROOT_CERT))?;
        let (_, root_parsed) = x509_parser::parse_x509_certificate(&root_der[0])
            .map_err(|e| anyhow::anyhow!("{}: {e}", in_file(ROOT_CERT)))?;
        let root_not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(root_parsed.validity().not_after.timestamp().max(0) as u64);
        // The chain up to the root, root last and only once.
        let mut chain_der = pem_blocks(&chain, &in_file(CERT_CHAIN))?;
        chain_der.retain(|der| *der != root_der[0]);
        let intermediates = chain_der
            .iter()
            .cloned()
            .map(CertificateDer::from)
            .collect();
        let root = to_pem(&root_der[0]);
        let chain = chain_der
            .iter()
            .map(|der| to_pem(der))
            .chain([root.clone()])
            .collect();
        let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", in_file(CA_CERT)))?;
        Ok(Self {
            issuer,
            chain,
            intermediates,
            root,
            root_der: CertificateDer::from(root_der[0].clone()),
            root_not_after,
            trust_domain: options.trust_domain.clone(),
            default_ttl: options.default_ttl,
            max_ttl: options.max_ttl,
        })
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root
    }

    pub fn root_not_after(&self) -> SystemTime {
        self.root_not_after
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Signs `csr_pem` for `caller`, valid for `ttl` (the default when
    /// `None`). The leaf carries `caller`'s SPIFFE identity and nothing
    /// else, whatever else the CSR asks for; a CSR that asks for another
    /// SPIFFE identity is refused. Returns the chain, leaf first, root last.
    pub fn sign(
        &self,
        csr_pem: &str,
        caller: &Identity,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, SignError> {
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl > self.max_ttl {
            return Err(SignError::TtlTooLong {
                requested: ttl,
                max: self.max_ttl,
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::MalformedCsr(e.to_string()))?;
        for san in &csr.params.subject_alt_names {
            if let SanType::URI(uri) = san {
                let uri = uri.as_str();
                if uri.starts_with("spiffe://") && uri != caller.to_string() {
                    return Err(SignError::OtherIdentity {
                        asked: uri.to_string(),
                        caller: caller.clone(),
                    });
                }
            }
        }
        let uri = caller
            .to_string()
            .try_into()
            .map_err(|e| SignError::Signing(format!("identity {caller} as a URI: {e}")))?;
        self.issue(&csr.public_key, vec![SanType::URI(uri)], ttl)
    }

    /// A leaf for `public_key` with exactly `sans`, valid for `ttl`, usable
    /// as a client and as a server certificate; the chain, leaf first.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        sans: Vec<SanType>,
        ttl: Duration,
    ) -> Result<Vec<String>, SignError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.serial_number = Some(serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - backdate(ttl);
        params.not_after = now + ttl;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        let mut chain = Vec::with_capacity(self.chain.len() + 1);
        chain.push(leaf.pem());
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// Makes `dir` a CA under this one, in the plugged-in layout: a new
    /// intermediate named `name`, its key, its chain and this CA's root.
    /// Clusters whose Citadels sign with intermediates of one root trust
    /// each other's workloads. It lives `ttl`, or until the root expires.
    pub fn create_intermediate(&self, dir: &Path, name: &str, ttl: Duration) -> anyhow::Result<()> {
        let key = KeyAlgorithm::EcdsaP256.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, self.trust_domain.as_str());
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - backdate(ttl);
        params.not_after = (now + ttl).min(OffsetDateTime::from(self.root_not_after));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?.pem();
        fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        // The key first, as for a self-signed CA.
        write_file(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
        write_file(&dir.join(CA_CERT), &cert, 0o644)?;
        let chain: String = [cert]
            .iter()
            .chain(&self.chain)
            .map(String::as_str)
            .collect();
        write_file(&dir.join(CERT_CHAIN), &chain, 0o644)?;
        write_file(&dir.join(ROOT_CERT), &self.root, 0o644)
    }

    /// The identity a client certificate proves: it must chain to this
    /// CA's root, be valid now, and carry a SPIFFE identity of this trust
    /// domain. The error says which of these failed.
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<Identity, String> {
        let identity = spiffe::verify(chain, &self.root_der, &self.intermediates, Usage::Client)?;
        if identity.trust_domain != self.trust_domain {
            return Err(format!(
                "the client certificate's identity {identity} is not of trust domain {}",
                self.trust_domain
            ));
        }
        Ok(identity)
    }
}

/// A random 128-bit serial number, positive.
fn serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The system's CSPRNG; failing to read it is not recoverable.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random number generator works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn create_self_signed(options: &CaOptions) -> anyhow::Result<()> {
    let key = options.key_algorithm.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, options.trust_domain.as_str());
    params.serial_number = Some(serial());
    let now = OffsetDateTime::now_utc();
    params.not_before = now - backdate(options.root_ttl);
    params.not_after = now + options.root_ttl;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?.pem();
    fs::create_dir_all(&options.dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", options.dir.display()))?;
    // The key first and private; the certificates after, so that a crash
    // midway leaves an incomplete set, which is reported, never a
    // certificate without its key.
    write_file(&options.dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    for name in [CA_CERT, CERT_CHAIN, ROOT_CERT] {
        write_file(&options.dir.join(name), &cert, 0o644)?;
    }
    Ok(())
}

/// Writes `contents` whole or not at all: to a temporary file, then renamed.
fn write_file(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    file.write_all(contents.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The DER certificates of a PEM file; an error names the file.
fn pem_blocks(pem: &str, file: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let blocks = pem::parse_many(pem).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    anyhow::ensure!(!certs.is_empty(), "{file}: no certificate in it");
    Ok(certs)
}

/// PEM with Unix line endings, as every other certificate here.
fn to_pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
