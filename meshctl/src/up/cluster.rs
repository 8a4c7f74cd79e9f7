//! One cluster of several, in Istio 1.1's multi-cluster model with
//! gateways: a primary cluster whose Galley other clusters follow, and
//! whose ingress gateway takes their calls to `<name>.<ns>.global` on
//! 15443; a cluster that follows it (its Galley a relay of the primary's);
//! and one root CA that both clusters' Citadels sign under, each with an
//! intermediate of its own, so that mesh mTLS holds across them.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

/// The port other clusters call this one's gateway on.
pub const CROSS_CLUSTER_PORT: u16 = 15443;

/// The multi-cluster gateway config, as `examples/multicluster` has it.
const CONFIG: (&str, &str) = (
    "multicluster.yaml",
    include_str!("../../../examples/multicluster/gateway.yaml"),
);

#[derive(Debug, Clone, Default, Args)]
pub struct ClusterArgs {
    /// Run as the primary of several clusters, reached by the others at
    /// this address: Galley's MCP listens there for the clusters that
    /// follow it, and the embedded config gains Istio 1.1's multi-cluster
    /// gateway (15443, `*.global`).
    #[arg(long, conflicts_with_all = ["follow", "ephemeral_ports"])]
    pub cluster_address: Option<IpAddr>,
    /// Run as a cluster that follows the primary Galley whose MCP is at
    /// ADDR: this cluster's Galley relays the primary's config to its own
    /// Pilot and Mixers (see `galley --follow`); its sample workloads are
    /// those the primary's config describes.
    #[arg(long, conflicts_with = "ephemeral_ports")]
    pub follow: Option<SocketAddr>,
    /// A directory holding a root CA shared by the clusters (Citadel's
    /// plugged-in layout; a root is made there when it is empty). This
    /// cluster's Citadel signs with an intermediate of its own under it,
    /// made at start.
    #[arg(long)]
    pub root_ca: Option<PathBuf>,
}

impl ClusterArgs {
    /// Where Galley serves MCP: the cluster address, for a primary.
    pub fn mcp_addr(&self, local: SocketAddr) -> SocketAddr {
        self.cluster_address
            .map_or(local, |ip| SocketAddr::new(ip, local.port()))
    }

    /// Whether this mesh is one of several: its gateway takes calls from
    /// other clusters.
    pub fn multi_cluster(&self) -> bool {
        self.cluster_address.is_some() || self.follow.is_some()
    }

    /// The config files a primary adds to the embedded config.
    pub fn config(&self) -> Option<(String, String)> {
        self.cluster_address
            .map(|_| (CONFIG.0.to_string(), CONFIG.1.to_string()))
    }

    /// Makes `ca_dir` an intermediate CA under the shared root, when there
    /// is one; the root is made first if its directory is empty.
    pub fn plug_ca(&self, ca_dir: &Path, name: &str) -> anyhow::Result<()> {
        let Some(root_dir) = &self.root_ca else {
            return Ok(());
        };
        let year = Duration::from_secs(365 * 86400);
        crate::ca::intermediate(root_dir, ca_dir, name, year)
    }
}
