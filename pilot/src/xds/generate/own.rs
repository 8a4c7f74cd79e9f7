//! A proxy's own resources (its inbound side), kept across the changes
//! that cannot alter them. An endpoint change elsewhere in the mesh, or a
//! route change, leaves two thousand proxies' inbound listeners as they
//! were; building them again would be most of the push.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use mesh_api::kinds;

use super::super::{LISTENER, ResourceSet};
use crate::{
    model::Change,
    proxy::{Proxy, ProxyKind},
};

/// A connected proxy as the generator knows it.
pub struct Client {
    pub proxy: Proxy,
    /// Its own resources by type, as last built.
    own: Mutex<HashMap<&'static str, Kept>>,
}

struct Kept {
    /// The model revision they were built from.
    revision: u64,
    names: Arc<BTreeSet<String>>,
    set: Arc<ResourceSet>,
}

impl Client {
    pub fn new(proxy: Proxy) -> Self {
        Self {
            proxy,
            own: Mutex::default(),
        }
    }

    /// The proxy's own resources of `type_url` for `names`: those kept, if
    /// no change since they were built can have altered them, else
    /// `build`'s, built at `log`'s revision.
    pub(super) fn own(
        &self,
        log: &ChangeLog,
        type_url: &'static str,
        names: &Arc<BTreeSet<String>>,
        build: impl FnOnce() -> Arc<ResourceSet>,
    ) -> Arc<ResourceSet> {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = own.get(type_url)
            && Arc::ptr_eq(&kept.names, names)
            && log.untouched_since(kept.revision, &self.proxy, type_url, names)
        {
            return kept.set.clone();
        }
        let set = build();
        let kept = Kept {
            revision: log.revision,
            names: names.clone(),
            set: set.clone(),
        };
        own.insert(type_url, kept);
        set
    }
}

/// The model's revision and its latest changes, to tell whether what was
/// built at an earlier revision is current.
#[derive(Clone, Default)]
pub(super) struct ChangeLog {
    revision: u64,
    changes: VecDeque<(u64, Arc<Change>)>,
}

impl ChangeLog {
    /// Changes remembered; what was built before them is built again.
    const KEPT: usize = 64;

    pub(super) fn push(&mut self, change: Change) {
        self.revision += 1;
        self.changes.push_back((self.revision, Arc::new(change)));
        if self.changes.len() > Self::KEPT {
            self.changes.pop_front();
        }
    }

    /// Whether every change after `since` leaves `proxy`'s own resources
    /// of `type_url` alone.
    fn untouched_since(
        &self,
        since: u64,
        proxy: &Proxy,
        type_url: &str,
        names: &BTreeSet<String>,
    ) -> bool {
        if since == self.revision {
            return true;
        }
        let remembered = self.changes.front().is_some_and(|(r, _)| *r <= since + 1);
        remembered
            && self
                .changes
                .iter()
                .filter(|(r, _)| *r > since)
                .all(|(_, change)| !touches_own(change, proxy, type_url, names))
    }
}

/// Whether `change` may alter `proxy`'s own resources of `type_url`: its
/// inbound clusters and listeners follow the services at its address, the
/// mesh config, Sidecars, and the authentication and RBAC policies; the
/// listeners a proxyless client asks for by name follow routes and
/// clusters too. A gateway's own clusters follow nearly everything.
fn touches_own(change: &Change, proxy: &Proxy, type_url: &str, names: &BTreeSet<String>) -> bool {
    if proxy.kind == ProxyKind::Router {
        return true;
    }
    let by_name = type_url == LISTENER
        && !names.is_empty()
        && [kinds::VIRTUAL_SERVICES, kinds::DESTINATION_RULES]
            .iter()
            .any(|c| change.collections.contains(c));
    !change.services.is_empty()
        || change.mesh
        || change.security()
        || change.collections.contains(kinds::SIDECARS)
        || change.addresses.contains(&proxy.ip.to_string())
        || by_name
}
