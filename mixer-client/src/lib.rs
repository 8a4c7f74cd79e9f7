//! The client side of Istio 1.1's Mixer API, apart from the Mixer server so
//! that the proxy links only what it uses: attribute bags and their
//! compressed wire form (`attributes`, which the server decodes with too),
//! and the check cache, retries and report batching of a proxy (`client`).

pub mod attributes;
pub mod client;
