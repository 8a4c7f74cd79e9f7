//! The Mesh Configuration Protocol engine, wire-compatible with Istio 1.1.
//!
//! One state machine per role ([`source`], [`sink`]) over plain message
//! streams, and thin gRPC [`transport`]s for the four ways of carrying them:
//! source as server (`ResourceSource`), source as client (dialing a
//! `ResourceSink`), sink as client, sink as server. A source serves what a
//! [`Store`] holds; a sink hands its component [`SinkSnapshot`]s.

pub mod follow;
pub mod memory;
pub mod metrics;
pub mod sink;
pub mod source;
pub mod store;
pub mod transport;

pub use follow::{follow, parse_endpoint};
pub use metrics::McpMetrics;
pub use sink::{HeldCollection, Payload, Sink, SinkOptions, SinkResource, SinkSnapshot};
pub use source::IncrementalPolicy;
pub use store::Store;
pub use transport::{
    MAX_MESSAGE_BYTES, SinkServer, SourceServer, connect, grpc_server, incoming, run_sink_client,
    run_source_client,
};
