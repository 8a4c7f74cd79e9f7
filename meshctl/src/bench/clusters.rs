//! `meshctl bench clusters`: how long a config edit at the primary cluster
//! takes to reach the proxies of a cluster that follows it (primary Galley
//! → the follower's relay Galley → its Pilot → its proxies' ACKs), against
//! the same edit within the primary (Galley → Pilot → ACKs), timed from
//! one file write in one run. Each cluster is a Galley and a Pilot as
//! processes, with `--proxies` ADS clients connected to its Pilot as
//! Bookinfo's sidecars, each ACKing every response. The relay Galley's CPU
//! and memory are its cost, next to the primary Galley's.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Args;
use component::{CancellationToken, cli::Cli, flags};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use mesh_api::xds::CLUSTER;
use serde_json::json;
use tokio::sync::mpsc;

use super::{Component, cpu_seconds, ms, rss_bytes};

#[derive(Debug, Args)]
pub struct ClustersBenchArgs {
    /// Config edits timed.
    #[arg(long, default_value_t = 10)]
    pub edits: usize,
    /// Sidecars connected to each cluster's Pilot.
    #[arg(long, default_value_t = 100)]
    pub proxies: usize,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Bookinfo's workloads, which the simulated sidecars play in turn.
const WORKLOADS: [(&str, &str); 6] = [
    ("productpage", "v1"),
    ("details", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("ratings", "v1"),
];

fn node(i: usize) -> Node {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let (app, version) = WORKLOADS[i % WORKLOADS.len()];
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let labels = Struct {
        fields: [("app", app), ("version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    Node {
        id: format!("sidecar~127.0.0.1~{app}-{version}-{i}.bookinfo~bookinfo.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [(
                mesh_api::xds::metadata::LABELS.to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    }
}

/// When a sidecar of cluster `.0` ACKed the clusters of edit `.1`.
type Acked = (usize, usize, Instant);

/// The edit whose marker (`edit-N.`, the edited ServiceEntry's host) a
/// response's resources name, the latest if several.
fn edit_of(resources: &[envoy_types::pb::google::protobuf::Any]) -> Option<usize> {
    const MARKER: &[u8] = b"edit-";
    resources
        .iter()
        .filter_map(|r| {
            let at = r.value.windows(MARKER.len()).position(|w| w == MARKER)?;
            let digits: String = r.value[at + MARKER.len()..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .map(|b| char::from(*b))
                .collect();
            digits.parse().ok()
        })
        .max()
}

/// A sidecar of cluster `cluster` that asks for every cluster and ACKs
/// every response, saying on `acked` when it ACKed a new edit's; until
/// `stop`.
async fn sidecar(
    xds: SocketAddr,
    node: Node,
    cluster: usize,
    acked: mpsc::UnboundedSender<Acked>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: CLUSTER.into(),
        ..Default::default()
    })?;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let mut responses = client
        .stream_aggregated_resources(requests)
        .await?
        .into_inner();
    let mut seen = None;
    loop {
        let response = tokio::select! {
            r = responses.message() => match r? {
                Some(r) => r,
                None => return Ok(()),
            },
            _ = stop.cancelled() => return Ok(()),
        };
        let edit = edit_of(&response.resources);
        tx.send(DiscoveryRequest {
            type_url: response.type_url,
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        })?;
        if edit > seen {
            seen = edit;
            let _ = acked.send((cluster, edit.unwrap_or_default(), Instant::now()));
        }
    }
}

/// One cluster: its Galley (following `primary` when given), its Pilot,
/// and the sidecars connected to it.
pub(super) struct Cluster {
    pub(super) galley: Component,
    mcp: SocketAddr,
    pub(super) pilot: Component,
    xds: SocketAddr,
}

impl Cluster {
    /// Its Galley serving `config_dir` and its Pilot, each with `env` set.
    pub(super) async fn start(
        bins: &Path,
        config_dir: &Path,
        primary: Option<SocketAddr>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mcp = launch::free_addr()?;
        let mut galley = flags!(Cli<galley::GalleyArgs> {
            args.config_dir: config_dir.display(),
            args.mcp_addr: mcp,
        });
        if let Some(primary) = primary {
            galley = galley.extend(flags!(Cli<galley::GalleyArgs> { args.follow: primary }));
        }
        let galley = Component::start_with_env(bins, "galley", galley, env).await?;
        let xds = launch::free_addr()?;
        let pilot =
            Component::start_with_env(bins, "pilot", Component::pilot_flags(mcp, xds, None), env)
                .await?;
        Ok(Self {
            galley,
            mcp,
            pilot,
            xds,
        })
    }

    /// Connects `count` sidecars as cluster `id`'s, and waits until each
    /// has ACKed its clusters.
    pub(super) async fn connect(
        &self,
        id: usize,
        count: usize,
        acked: &mpsc::UnboundedSender<Acked>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        for i in 0..count {
            let (xds, acked, stop) = (self.xds, acked.clone(), stop.clone());
            tokio::spawn(async move {
                if let Err(e) = sidecar(xds, node(i), id, acked, stop.clone()).await
                    && !stop.is_cancelled()
                {
                    tracing::warn!("a simulated sidecar stopped: {e:#}");
                }
            });
        }
        let client = reqwest::Client::builder().no_proxy().build()?;
        super::delivered(&client, self.pilot.admin, CLUSTER, &[], count).await
    }
}

/// The edit: a ServiceEntry that every Bookinfo sidecar sees, new each
/// round, so that every sidecar gets new clusters.
pub(super) fn edit(config_dir: &Path, round: usize) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: bench-edit, namespace: bookinfo}}
spec:
  hosts: [edit-{round}.bookinfo.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: 9099}}}}]
"
    );
    std::fs::write(config_dir.join("bench-edit.yaml"), text)?;
    Ok(())
}

/// p50 and max of `times`, in milliseconds.
pub(super) fn spread(mut times: Vec<Duration>) -> serde_json::Value {
    times.sort();
    json!({"p50": ms(times[times.len() / 2]), "max": ms(times[times.len() - 1])})
}

pub async fn run(args: ClustersBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.edits > 0, "--edits must be positive");
    super::raise_open_files_limit()?;
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    let primary_dir = tempfile::tempdir()?;
    for (name, text) in crate::up::bookinfo_config() {
        std::fs::write(primary_dir.path().join(name), text)?;
    }
    edit(primary_dir.path(), 0)?;
    let follower_dir = tempfile::tempdir()?;
    let primary = Cluster::start(&bins, primary_dir.path(), None, &[]).await?;
    let follower = Cluster::start(&bins, follower_dir.path(), Some(primary.mcp), &[]).await?;

    let stop = CancellationToken::new();
    let (acked, mut acks) = mpsc::unbounded_channel();
    for (id, cluster) in [&primary, &follower].into_iter().enumerate() {
        cluster.connect(id, args.proxies, &acked, &stop).await?;
    }
    // The initial config's ACKs.
    while acks.try_recv().is_ok() {}

    let galleys = [primary.galley.pid(), follower.galley.pid()];
    let cpu_before = galleys.map(|pid| cpu_seconds(pid).unwrap_or_default());
    let (mut within, mut across, mut relay) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.edits {
        let t = Instant::now();
        edit(primary_dir.path(), round)?;
        // The last ACK of this edit's clusters in each cluster.
        let (mut count, mut last) = ([0; 2], [t; 2]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while count != [args.proxies; 2] {
            let (cluster, edit, at) = tokio::time::timeout_at(deadline, acks.recv())
                .await
                .map_err(|_| anyhow::anyhow!("edit {round} not ACKed everywhere in 60 s"))?
                .ok_or_else(|| anyhow::anyhow!("the sidecars stopped"))?;
            if edit == round {
                count[cluster] += 1;
                last[cluster] = last[cluster].max(at);
            }
        }
        within.push(last[0] - t);
        across.push(last[1] - t);
        relay.push(
            ms(last[1].saturating_duration_since(last[0]))
                - ms(last[0].saturating_duration_since(last[1])),
        );
    }
    stop.cancel();
    relay.sort_by(f64::total_cmp);
    let cpu_after = galleys.map(|pid| cpu_seconds(pid).unwrap_or_default());
    let galley = |i: usize| {
        json!({
            "rss_bytes": rss_bytes(galleys[i], "VmRSS:").unwrap_or_default(),
            "cpu_seconds_over_the_edits": ((cpu_after[i] - cpu_before[i]) * 1e3).round() / 1e3,
        })
    };
    let figures = json!({
        "edits": args.edits,
        "proxies_per_cluster": args.proxies,
        "edit_to_last_ack_ms": {
            "within_the_primary_cluster": spread(within),
            "in_the_cluster_that_follows": spread(across),
            // Negative when the follower's last ACK came first.
            "follower_minus_primary": {
                "p50": relay[relay.len() / 2],
                "max": relay[relay.len() - 1],
            },
        },
        "primary_galley": galley(0),
        "relay_galley": galley(1),
    });
    super::report(&figures, args.out.as_deref())
}
