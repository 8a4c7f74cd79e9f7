//! `meshctl bench citadel`: CSRs signed per second and the latency of each,
//! through the Citadel binary over gRPC and TLS (CreateCertificate with a
//! bootstrap token) and, as the baseline in the same run, by `openssl x509
//! -req` signing the same CSRs with the same CA key and the same
//! extensions, one process per CSR as a shell-script CA does. Both run the
//! same number of requests at once.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use mesh_api::pb::istio::v1::auth::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use serde_json::json;
use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use component::{cli::Cli, flags};

use super::{Component, cpu_seconds, ms};

#[derive(Debug, Args)]
pub struct CitadelBenchArgs {
    #[arg(long, default_value_t = 2_000)]
    pub csrs: usize,
    /// Requests (or openssl processes) in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Directory holding the citadel binary; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/bench";

/// Requests per second and latency percentiles of one run.
fn figures(latencies: &mut [Duration], wall: Duration) -> serde_json::Value {
    latencies.sort();
    let at = |q: f64| ms(latencies[((latencies.len() - 1) as f64 * q).round() as usize]);
    json!({
        "per_second": (latencies.len() as f64 / wall.as_secs_f64()).round(),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "wall_ms": ms(wall),
    })
}

/// Runs `job(i)` for every CSR, `concurrency` at a time; the latency of
/// each and the wall time of all.
async fn timed<F, Fut>(
    count: usize,
    concurrency: usize,
    job: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let work = job(i);
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let result = work.await;
            drop(permit);
            result.map(|()| begun.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for task in tasks {
        latencies.push(task.await??);
    }
    Ok((latencies, started.elapsed()))
}

pub async fn run(args: CitadelBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.csrs > 0 && args.concurrency > 0,
        "--csrs and --concurrency must be positive"
    );
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "bench/bench bench-token\n")?;
    let ca_dir = dir.path().join("ca");
    let grpc = launch::free_addr()?;
    let mut citadel = Component::start(
        &bins,
        "citadel",
        flags!(Cli<citadel::CitadelArgs> {
            args.grpc_addr: grpc,
            args.ca_dir: ca_dir.display(),
            args.bootstrap_tokens: tokens.display(),
            args.grpc_hostnames: "localhost",
        }),
    )
    .await?;
    let pid = citadel.pid();

    // The same CSRs for both, made before either is timed.
    let csrs: Arc<Vec<String>> = Arc::new(
        (0..args.csrs)
            .map(|_| csr())
            .collect::<anyhow::Result<_>>()?,
    );

    let root = std::fs::read_to_string(ca_dir.join("root-cert.pem"))?;
    let channel = Channel::from_shared(format!("https://{grpc}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&root))
                .domain_name("localhost"),
        )?
        .connect()
        .await?;
    let cpu_before = cpu_seconds(pid)?;
    let (mut ours, ours_wall) = timed(args.csrs, args.concurrency, |i| {
        let (csrs, channel) = (csrs.clone(), channel.clone());
        async move {
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr: csrs[i].clone(),
                ..Default::default()
            });
            request
                .metadata_mut()
                .insert("authorization", "Bearer bench-token".parse()?);
            let chain = IstioCertificateServiceClient::new(channel)
                .create_certificate(request)
                .await?
                .into_inner()
                .cert_chain;
            anyhow::ensure!(chain.len() == 2, "a chain of {} certificates", chain.len());
            Ok(())
        }
    })
    .await?;
    let citadel_cpu = cpu_seconds(pid)? - cpu_before;

    let ext = dir.path().join("leaf.ext");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{IDENTITY}\nauthorityKeyIdentifier=keyid\n"
        ),
    )?;
    let csr_dir = dir.path().join("csrs");
    std::fs::create_dir_all(&csr_dir)?;
    for (i, csr) in csrs.iter().enumerate() {
        std::fs::write(csr_dir.join(format!("{i}.pem")), csr)?;
    }
    let (dir_path, ca) = (Arc::new(dir.path().to_path_buf()), Arc::new(ca_dir));
    let (mut openssl, openssl_wall) = timed(args.csrs, args.concurrency, |i| {
        let (dir, ca) = (dir_path.clone(), ca.clone());
        async move { openssl_sign(&dir, &ca, i).await }
    })
    .await?;
    citadel.child.kill().await?;

    let figures = json!({
        "benchmark": "citadel",
        "csrs": args.csrs,
        "concurrency": args.concurrency,
        "key": "ECDSA P-256 (CA and CSRs)",
        "citadel_grpc_tls": figures(&mut ours, ours_wall),
        "citadel_cpu_seconds": (citadel_cpu * 100.0).round() / 100.0,
        "openssl_x509_req_baseline": figures(&mut openssl, openssl_wall),
    });
    super::report(&figures, args.out.as_deref())
}

/// Signs CSR `i` with `openssl x509 -req`, as Citadel would.
async fn openssl_sign(dir: &Path, ca: &Path, i: usize) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-set_serial"])
        .arg((i + 1).to_string())
        .arg("-in")
        .arg(dir.join("csrs").join(format!("{i}.pem")))
        .arg("-CA")
        .arg(ca.join("ca-cert.pem"))
        .arg("-CAkey")
        .arg(ca.join("ca-key.pem"))
        .arg("-extfile")
        .arg(dir.join("leaf.ext"))
        .arg("-out")
        .arg(dir.join("csrs").join(format!("{i}.crt")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running openssl (the baseline needs it on PATH): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "openssl x509 -req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A CSR with a fresh ECDSA P-256 key, asking for the bench identity.
fn csr() -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(IDENTITY.try_into()?)];
    Ok(params.serialize_request(&key)?.pem()?)
}
