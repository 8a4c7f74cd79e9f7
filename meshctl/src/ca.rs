//! `meshctl ca intermediate`: a CA for one cluster's Citadel, under a root
//! that several clusters share, so that their workloads trust each other.
//! The files are Citadel's plugged-in layout, for `citadel --ca-dir` or,
//! in Kubernetes, the Secret `istio-ca-secret`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

#[derive(Debug, Args)]
pub struct IntermediateArgs {
    /// The shared root, a directory in Citadel's layout; a root is made
    /// there when it is empty.
    #[arg(long)]
    pub root_ca: PathBuf,
    /// Where the intermediate goes (`ca-cert.pem`, `ca-key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`).
    #[arg(long)]
    pub out: PathBuf,
    /// The intermediate's common name: the cluster's, say.
    #[arg(long, default_value = "intermediate")]
    pub name: String,
    /// How long it is valid (never past the root).
    #[arg(long, default_value = "1y", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

/// The trust domain the root names, Citadel's default: certificates carry
/// the workloads' own identities whatever it is.
const TRUST_DOMAIN: &str = "cluster.local";

/// The root's lifetime, when one is made.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86400);

/// Makes `out` an intermediate CA named `name` under the root in
/// `root_dir`, making that root first when the directory is empty.
pub fn intermediate(root_dir: &Path, out: &Path, name: &str, ttl: Duration) -> anyhow::Result<()> {
    let root = citadel::ca::Ca::load_or_create(&citadel::ca::CaOptions {
        dir: root_dir.to_path_buf(),
        self_signed: true,
        key_algorithm: Default::default(),
        trust_domain: TRUST_DOMAIN.into(),
        root_ttl: ROOT_TTL,
        default_ttl: ttl,
        max_ttl: ttl,
    })
    .map_err(|e| anyhow::anyhow!("root CA {}: {e:#}", root_dir.display()))?;
    root.create_intermediate(out, name, ttl)
}

pub fn run(args: IntermediateArgs) -> anyhow::Result<()> {
    intermediate(&args.root_ca, &args.out, &args.name, args.ttl)?;
    println!("{}", args.out.display());
    Ok(())
}
