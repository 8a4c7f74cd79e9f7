//! Per-collection MCP metrics, one set for each role (`mcp_source_*`,
//! `mcp_sink_*`), registered in the component's admin registry.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectionLabel {
    pub collection: String,
}

#[derive(Clone, Default)]
pub struct McpMetrics {
    streams_open: Family<CollectionLabel, Gauge>,
    responses: Family<CollectionLabel, Counter>,
    acks: Family<CollectionLabel, Counter>,
    nacks: Family<CollectionLabel, Counter>,
    stale_nonces: Family<CollectionLabel, Counter>,
    resources: Family<CollectionLabel, Gauge>,
    bytes: Family<CollectionLabel, Counter>,
    refused: Family<CollectionLabel, Gauge>,
}

impl McpMetrics {
    /// Registers the source role's metrics (`mcp_source_*`).
    pub fn source(registry: &mut Registry) -> Self {
        Self::register(registry.sub_registry_with_prefix("mcp_source"), "sent")
    }

    /// Registers the sink role's metrics (`mcp_sink_*`).
    pub fn sink(registry: &mut Registry) -> Self {
        Self::register(registry.sub_registry_with_prefix("mcp_sink"), "received")
    }

    fn register(r: &mut Registry, direction: &str) -> Self {
        let m = Self::default();
        r.register(
            "streams_open",
            "Streams with a watch on the collection",
            m.streams_open.clone(),
        );
        r.register(
            format!("responses_{direction}"),
            "Resources messages",
            m.responses.clone(),
        );
        r.register("acks", "ACKs of Resources messages", m.acks.clone());
        r.register("nacks", "NACKs of Resources messages", m.nacks.clone());
        r.register(
            "stale_nonces",
            "Requests ignored for a stale nonce",
            m.stale_nonces.clone(),
        );
        r.register("resources", "Resources held", m.resources.clone());
        r.register(
            format!("bytes_{direction}"),
            "Encoded bytes of Resources messages",
            m.bytes.clone(),
        );
        r.register(
            "collections_refused",
            "1 while the peer refuses the collection (a source that does not serve it)",
            m.refused.clone(),
        );
        m
    }

    /// ACKs counted so far for `collection`.
    pub fn acks(&self, collection: &str) -> u64 {
        self.acks.get_or_create(&label(collection)).get()
    }

    /// Encoded bytes of `Resources` counted so far for `collection`.
    pub fn bytes(&self, collection: &str) -> u64 {
        self.bytes.get_or_create(&label(collection)).get()
    }

    pub(crate) fn stream_opened(&self, c: &str) {
        self.streams_open.get_or_create(&label(c)).inc();
    }
    pub(crate) fn stream_closed(&self, c: &str) {
        self.streams_open.get_or_create(&label(c)).dec();
    }
    pub(crate) fn response(&self, c: &str, bytes: usize) {
        self.responses.get_or_create(&label(c)).inc();
        self.bytes.get_or_create(&label(c)).inc_by(bytes as u64);
    }
    pub(crate) fn ack(&self, c: &str) {
        self.acks.get_or_create(&label(c)).inc();
    }
    pub(crate) fn nack(&self, c: &str) {
        self.nacks.get_or_create(&label(c)).inc();
    }
    pub(crate) fn stale_nonce(&self, c: &str) {
        self.stale_nonces.get_or_create(&label(c)).inc();
    }
    pub(crate) fn refused(&self, c: &str, refused: bool) {
        self.refused
            .get_or_create(&label(c))
            .set(i64::from(refused));
    }
    pub(crate) fn resources_held(&self, c: &str, n: usize) {
        self.resources.get_or_create(&label(c)).set(n as i64);
    }
}

fn label(collection: &str) -> CollectionLabel {
    CollectionLabel {
        collection: collection.to_string(),
    }
}
