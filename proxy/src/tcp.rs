//! The TCP proxy: a connection spliced to an endpoint of a cluster picked
//! by weight (or, behind Envoy's `sni_cluster` filter, named by the
//! connection's TLS server name), bytes copied both ways until either side
//! closes.

use std::{net::SocketAddr, sync::Arc};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    config::{listener::TcpApp, pick_weighted},
    upstream::Upstreams,
};

/// Splices the connection, which asked for `sni`; the bytes received from
/// the caller and sent to it.
pub async fn proxy<IO>(
    mut downstream: IO,
    app: &TcpApp,
    upstreams: &Arc<Upstreams>,
    destination: Option<SocketAddr>,
    sni: Option<&str>,
) -> (u64, u64)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = match app.sni_cluster {
        true => sni,
        false => pick_weighted(&app.clusters, |(_, w)| *w)
            .map(|i| &app.clusters[i])
            .or(app.clusters.first())
            .map(|(n, _)| n.as_str()),
    };
    let Some(cluster) = name.and_then(|n| upstreams.get(n)) else {
        tracing::debug!(listener = %app.stat_prefix, "no cluster for the connection");
        return (0, 0);
    };
    let Some(endpoint) = cluster.pick(&[], None, destination) else {
        tracing::debug!(cluster = %cluster.config.name, "no healthy upstream");
        return (0, 0);
    };
    let mut upstream = match cluster.connector.connect(endpoint.addr).await {
        Ok(s) => s,
        Err(e) => {
            cluster.record(&endpoint, true);
            tracing::debug!(endpoint = %endpoint.addr, "upstream connect failed: {e}");
            return (0, 0);
        }
    };
    let in_flight = endpoint.in_flight();
    let copied = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    drop(in_flight);
    cluster.record(&endpoint, false);
    match copied {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::debug!(endpoint = %endpoint.addr, "connection ended: {e}");
            (0, 0)
        }
    }
}
