//! Sets of generated resources shared between proxies, and the
//! differences between two of them.
//!
//! Two thousand proxies of one scope hold the same six thousand clusters.
//! Each holds a pointer to one [`ResourceSet`] rather than a list of its
//! own, and when the set is replaced, the difference from the old one is
//! worked out once, by the first proxy to need it, and handed to the rest.

use std::{
    collections::BTreeSet,
    sync::{Arc, LazyLock, Mutex, OnceLock, Weak},
};

use bytes::Bytes;

use super::Resource;

/// Resources of one type in name order, with one hash of them all.
#[derive(Debug, Default)]
pub struct ResourceSet {
    resources: Vec<Arc<Resource>>,
    hash: u64,
    /// The last difference worked out from an older set to this one.
    last_diff: Mutex<Option<(Weak<ResourceSet>, Arc<Diff>)>>,
    /// The set as response fields, state of the world and delta, encoded
    /// once for every proxy it goes to.
    encoded: [OnceLock<Bytes>; 2],
}

/// What differs between an older set and a newer one.
#[derive(Debug, Default)]
pub struct Diff {
    /// Resources new or changed in the newer set, in name order.
    pub changed: Arc<ResourceSet>,
    /// Names only the older set has.
    pub removed: Vec<Arc<str>>,
}

impl PartialEq for ResourceSet {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.resources == other.resources
    }
}

impl ResourceSet {
    /// The set of `resources`, put in name order; of two with one name, the
    /// first is kept.
    pub fn new(mut resources: Vec<Arc<Resource>>) -> Arc<Self> {
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        resources.dedup_by(|later, first| later.name == first.name);
        Self::sorted(resources)
    }

    /// The set of `resources`, already in name order without repeats.
    fn sorted(mut resources: Vec<Arc<Resource>>) -> Arc<Self> {
        debug_assert!(resources.windows(2).all(|w| w[0].name < w[1].name));
        resources.shrink_to_fit();
        let hash = resources.iter().fold(resources.len() as u64, |h, r| {
            h.rotate_left(7).wrapping_mul(0x100_0000_01b3) ^ r.hash
        });
        Arc::new(Self {
            resources,
            hash,
            last_diff: Mutex::default(),
            encoded: Default::default(),
        })
    }

    /// The empty set, one allocation for every user.
    pub fn empty() -> Arc<Self> {
        static EMPTY: LazyLock<Arc<ResourceSet>> =
            LazyLock::new(|| ResourceSet::sorted(Vec::new()));
        EMPTY.clone()
    }

    /// The set encoded by `encode`, done once per set for each of the two
    /// encodings (`delta` or not).
    pub(crate) fn encoded(
        &self,
        delta: bool,
        encode: impl FnOnce(&[Arc<Resource>]) -> Bytes,
    ) -> Bytes {
        self.encoded[usize::from(delta)]
            .get_or_init(|| encode(&self.resources))
            .clone()
    }

    pub fn resources(&self) -> &[Arc<Resource>] {
        &self.resources
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// A hash of every resource's name and content: equal sets have equal
    /// hashes.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resources
            .binary_search_by(|r| (*r.name).cmp(name))
            .is_ok()
    }

    /// The resources named in `names`, every one when it is empty: one walk
    /// over both, as both are in order. The set itself when that is every
    /// resource.
    pub fn select(self: &Arc<Self>, names: &BTreeSet<String>) -> Arc<Self> {
        if names.is_empty() {
            return self.clone();
        }
        let mut wanted = names.iter().peekable();
        let selected: Vec<Arc<Resource>> = self
            .resources
            .iter()
            .filter(|r| {
                while wanted.next_if(|n| n.as_str() < &*r.name).is_some() {}
                wanted.peek().is_some_and(|n| n.as_str() == &*r.name)
            })
            .cloned()
            .collect();
        if selected.len() == self.len() {
            return self.clone();
        }
        Self::sorted(selected)
    }

    /// Every resource of both sets (disjoint by name), in name order.
    pub fn union(&self, other: &Self) -> Arc<Self> {
        let mut all = Vec::with_capacity(self.len() + other.len());
        all.extend(self.resources.iter().cloned());
        all.extend(other.resources.iter().cloned());
        Self::new(all)
    }

    /// The set without the resources named in `names`.
    pub fn without(&self, names: &BTreeSet<String>) -> Arc<Self> {
        Self::sorted(
            self.resources
                .iter()
                .filter(|r| !names.contains(&*r.name))
                .cloned()
                .collect(),
        )
    }

    /// What differs from `old` to this set. The last difference worked out
    /// is kept: proxies of one scope move from the same old set to the same
    /// new one.
    pub fn diff_from(self: &Arc<Self>, old: &Arc<Self>) -> Arc<Diff> {
        if Arc::ptr_eq(self, old) {
            return Arc::default();
        }
        let mut last = self.last_diff.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, diff)) = last.as_ref()
            && std::ptr::eq(from.as_ptr(), Arc::as_ptr(old))
        {
            return diff.clone();
        }
        let diff = Arc::new(walk(old, self.resources.iter()));
        *last = Some((Arc::downgrade(old), diff.clone()));
        diff
    }
}

/// What differs from `old` to `now`, both in name order: one walk over both.
fn walk<'a>(old: &ResourceSet, now: impl Iterator<Item = &'a Arc<Resource>>) -> Diff {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let mut held = old.resources.iter().peekable();
    for r in now {
        while let Some(gone) = held.next_if(|h| h.name < r.name) {
            removed.push(gone.name.clone());
        }
        if held.next_if(|h| h.name == r.name).map(|h| h.hash) != Some(r.hash) {
            changed.push(r.clone());
        }
    }
    removed.extend(held.map(|h| h.name.clone()));
    Diff {
        changed: ResourceSet::sorted(changed),
        removed,
    }
}

/// What one proxy should have of one type: a part it shares with the other
/// proxies of its scope and a part of its own (its inbound side), disjoint
/// by name.
#[derive(Debug, Clone)]
pub struct Generated {
    pub shared: Arc<ResourceSet>,
    pub own: Arc<ResourceSet>,
}

impl Generated {
    pub fn hash(&self) -> u64 {
        self.shared.hash.rotate_left(17) ^ self.own.hash
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shared.contains(name) || self.own.contains(name)
    }

    /// What differs from `old`, a list of names and hashes, to both parts:
    /// the resources of each part new or changed (the part itself when that
    /// is all of it, so that a first response shares the generator's set),
    /// and the names only `old` has.
    pub fn diff_from(&self, old: &ResourceSet) -> (Vec<Arc<ResourceSet>>, Vec<Arc<str>>) {
        let changed = [&self.shared, &self.own]
            .into_iter()
            .filter(|part| !part.is_empty())
            .map(|part| {
                let changed = walk(old, part.resources.iter()).changed;
                if changed.len() == part.len() {
                    part.clone()
                } else {
                    changed
                }
            })
            .filter(|c| !c.is_empty())
            .collect();
        let removed = old
            .resources
            .iter()
            .filter(|r| !self.contains(&r.name))
            .map(|r| r.name.clone())
            .collect();
        (changed, removed)
    }

    /// Both parts as one set.
    pub fn merged(&self) -> Arc<ResourceSet> {
        if self.own.is_empty() {
            return self.shared.clone();
        }
        self.shared.union(&self.own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, content: &str) -> Arc<Resource> {
        Resource::from_any(name, bytes::Bytes::copy_from_slice(content.as_bytes()))
    }

    fn names(set: &ResourceSet) -> Vec<&str> {
        set.resources().iter().map(|r| &*r.name).collect()
    }

    #[test]
    fn a_set_is_in_name_order_and_keeps_the_first_of_a_name() {
        let set = ResourceSet::new(vec![r("b", "1"), r("a", "1"), r("b", "2")]);
        assert_eq!(names(&set), ["a", "b"]);
        assert_eq!(set.resources()[1], r("b", "1"));
        let same = ResourceSet::new(vec![r("a", "1"), r("b", "1")]);
        assert_eq!(set.hash(), same.hash());
        let other = ResourceSet::new(vec![r("a", "1"), r("b", "2")]);
        assert_ne!(set.hash(), other.hash());
    }

    #[test]
    fn the_diff_names_what_changed_and_what_went() {
        let old = ResourceSet::new(vec![r("a", "1"), r("b", "1"), r("c", "1")]);
        let new = ResourceSet::new(vec![r("b", "2"), r("c", "1"), r("d", "1")]);
        let diff = new.diff_from(&old);
        assert_eq!(names(&diff.changed), ["b", "d"]);
        assert_eq!(diff.removed, [Arc::<str>::from("a")]);
        let back = old.diff_from(&new);
        assert_eq!(names(&back.changed), ["a", "b"]);
        assert_eq!(back.removed, [Arc::<str>::from("d")]);
        assert!(new.diff_from(&new).changed.is_empty());
    }

    #[test]
    fn a_diff_is_worked_out_once_per_pair() {
        let old = ResourceSet::new(vec![r("a", "1")]);
        let new = ResourceSet::new(vec![r("a", "2")]);
        let first = new.diff_from(&old);
        assert!(Arc::ptr_eq(&first, &new.diff_from(&old)));
        // Another old set with the same content is another pair.
        let other = ResourceSet::new(vec![r("a", "1")]);
        let second = new.diff_from(&other);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(names(&second.changed), ["a"]);
    }

    #[test]
    fn selecting_every_name_gives_the_set_itself() {
        let set = ResourceSet::new(vec![r("a", "1"), r("b", "1"), r("c", "1")]);
        let all: BTreeSet<String> = ["a", "b", "c", "z"].map(String::from).into();
        assert!(Arc::ptr_eq(&set, &set.select(&all)));
        let some: BTreeSet<String> = ["a", "c", "x"].map(String::from).into();
        assert_eq!(names(&set.select(&some)), ["a", "c"]);
    }
}
