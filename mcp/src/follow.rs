//! A component's MCP input in one call: a sink whose metrics and sync state
//! appear on the component's admin port, kept connected to a source.

use std::sync::Arc;

use component::{Admin, CancellationToken};
use tonic::transport::Endpoint;

use crate::{McpMetrics, Sink, SinkOptions, SinkSnapshot, run_sink_client};

/// Parses a source or sink address: `host:port` or an `http://` URL.
pub fn parse_endpoint(address: &str) -> Result<Endpoint, String> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(url).map_err(|e| format!("invalid MCP address {address:?}: {e}"))
}

/// Starts a sink named `id` for `collections`, following the source at
/// `server` (with backoff) until `shutdown`; `fallbacks` are asked for
/// while the source refuses what they stand in for
/// ([`SinkOptions::fallbacks`]). The admin's readiness gains an
/// `mcp-synced` condition that holds once every collection has synced (or
/// been refused by the source), and `/debug/mcp` shows each collection.
pub fn follow(
    id: &str,
    collections: &[&str],
    fallbacks: &[(&str, &[&str])],
    server: &str,
    admin: &Admin,
    shutdown: CancellationToken,
) -> Result<Arc<Sink>, String> {
    let endpoint = parse_endpoint(server)?;
    let metrics = McpMetrics::sink(&mut admin.registry());
    let mut options = SinkOptions::new(id, collections.iter().copied());
    options.fallbacks = fallbacks
        .iter()
        .map(|(c, standins)| {
            (
                c.to_string(),
                standins.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect();
    let sink = Arc::new(Sink::new(options, metrics));
    let synced = admin.readiness().condition("mcp-synced");
    let snapshots = sink.subscribe();
    let source = server.to_string();
    admin.debug_page("mcp", move || debug(&source, &snapshots.borrow()));
    let tracker = sink.clone();
    tokio::spawn(async move { tracker.track_synced(synced).await });
    tracing::info!(%server, sink = id, "following MCP source");
    tokio::spawn(run_sink_client(sink.clone(), endpoint, shutdown));
    Ok(sink)
}

/// `/debug/mcp`: per collection, whether it synced, the version and count
/// held, and the source's refusal.
fn debug(source: &str, snapshot: &SinkSnapshot) -> serde_json::Value {
    let collections: serde_json::Map<String, serde_json::Value> = snapshot
        .collections
        .iter()
        .map(|(name, held)| {
            let state = serde_json::json!({
                "synced": held.synced,
                "version": held.version,
                "resources": held.resources.len(),
                "absent": held.refused,
            });
            (name.clone(), state)
        })
        .collect();
    serde_json::json!({"source": source, "collections": collections})
}
