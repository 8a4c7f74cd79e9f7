//! What the proxy runs, compiled from the xDS resources it holds. A
//! [`Snapshot`] is immutable: a change builds a new one and swaps it in, so
//! a request sees one config from start to end, and a config that does not
//! compile is refused whole (NACKed) while the last good one serves.

pub mod cluster;
pub mod jwt;
pub mod listener;
pub mod rbac;
pub mod route;
pub mod tls;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

pub use cluster::{Cluster, Endpoints};
pub use listener::Listener;
pub use route::{RouteTable, RouteTables};

/// Why a resource cannot be applied; becomes a NACK's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One of `items`, each as likely as its weight: how weighted clusters are
/// chosen, for HTTP routes and TCP proxies alike. `None` when all weigh 0.
pub fn pick_weighted<T>(items: &[T], weight: impl Fn(&T) -> u32) -> Option<usize> {
    let total: u32 = items.iter().map(&weight).sum();
    if total == 0 {
        return None;
    }
    let mut roll = fastrand::u32(0..total);
    items.iter().position(|item| {
        let w = weight(item);
        let hit = roll < w;
        roll = roll.saturating_sub(w);
        hit
    })
}

pub(crate) fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)
}

/// The compiled config.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub listeners: BTreeMap<String, Arc<Listener>>,
    pub routes: RouteTables,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// EDS endpoints by service name.
    pub endpoints: HashMap<String, Arc<Endpoints>>,
    /// Every type has arrived, and every name the config asks for.
    pub synced: bool,
}

impl Snapshot {
    /// The listener a redirected connection to `destination` belongs to:
    /// one bound to exactly that address, else a wildcard one on its port.
    pub fn listener_for(&self, destination: std::net::SocketAddr) -> Option<&Arc<Listener>> {
        let exact = self.listeners.values().find(|l| l.address == destination);
        exact.or_else(|| {
            self.listeners
                .values()
                .find(|l| l.address.ip().is_unspecified() && l.address.port() == destination.port())
        })
    }

    /// EDS names the clusters ask for.
    pub fn eds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .clusters
            .values()
            .filter_map(|c| match &c.discovery {
                cluster::Discovery::Eds(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// RDS names the listeners ask for.
    pub fn rds_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .listeners
            .values()
            .flat_map(|l| l.rds_names().map(str::to_string).collect::<Vec<_>>())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_picks_follow_the_weights() {
        let items = [("a", 1), ("never", 0), ("b", 3)];
        let mut counts = HashMap::new();
        for _ in 0..4000 {
            let (name, _) = items[pick_weighted(&items, |(_, w)| *w).unwrap()];
            *counts.entry(name).or_insert(0) += 1;
        }
        assert_eq!(counts.get("never"), None);
        let b = counts["b"];
        assert!((2700..3300).contains(&b), "b picked {b} times of 4000");
        assert_eq!(pick_weighted(&[("x", 0)], |(_, w)| *w), None);
    }

    fn listener(name: &str, address: &str) -> (String, Arc<Listener>) {
        let l = Listener {
            name: name.into(),
            address: address.parse().unwrap(),
            bind: false,
            use_original_dst: false,
            chains: Vec::new(),
        };
        (name.to_string(), Arc::new(l))
    }

    #[test]
    fn redirected_connections_find_their_listener_exact_address_first() {
        let snapshot = Snapshot {
            listeners: [
                listener("0.0.0.0_9080", "0.0.0.0:9080"),
                listener("10.0.0.7_3306", "10.0.0.7:3306"),
            ]
            .into(),
            ..Default::default()
        };
        let name = |dst: &str| {
            snapshot
                .listener_for(dst.parse().unwrap())
                .map(|l| l.name.clone())
        };
        assert_eq!(name("10.0.0.7:3306").as_deref(), Some("10.0.0.7_3306"));
        assert_eq!(name("10.9.9.9:9080").as_deref(), Some("0.0.0.0_9080"));
        assert_eq!(name("10.9.9.9:3306"), None);
    }
}
