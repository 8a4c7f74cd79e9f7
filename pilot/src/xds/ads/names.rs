//! Subscribed names, shared between streams: proxies of one kind ask for
//! the same thousands of names, and each stream holds a pointer to one
//! copy instead of its own.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, Weak},
};

use tonic::Status;

/// Lists kept as the candidates a new request's names are matched with.
const RECENT: usize = 4;

/// Names in the order a request listed them, as they were encoded (each
/// name's length, a varint, then its bytes), with the set they make.
/// Envoy repeats its list in the same order in every request of a type, so
/// a request is matched against the list it sent last without reading its
/// names into strings (see `sotw::Reader`).
#[derive(Debug, Default)]
pub(super) struct NameList {
    bytes: Box<[u8]>,
    set: Arc<BTreeSet<String>>,
}

impl NameList {
    pub(super) fn set(&self) -> &Arc<BTreeSet<String>> {
        &self.set
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends `name` to a list's bytes.
    pub(super) fn push(bytes: &mut Vec<u8>, name: &[u8]) {
        prost::encoding::encode_varint(name.len() as u64, bytes);
        bytes.extend_from_slice(name);
    }

    /// The names of a list's bytes, in order.
    fn names(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
        std::iter::from_fn(move || {
            if bytes.is_empty() {
                return None;
            }
            // Written by `push`: a length, then as many bytes.
            let len = prost::encoding::decode_varint(&mut bytes).ok()? as usize;
            let (name, rest) = bytes.split_at(len);
            bytes = rest;
            Some(name)
        })
    }
}

#[derive(Clone, Default)]
pub(super) struct NameSets(Arc<Mutex<Interned>>);

#[derive(Default)]
struct Interned {
    sets: HashMap<u64, Weak<BTreeSet<String>>>,
    /// Lists by a quick hash of their bytes.
    lists: HashMap<u64, Weak<NameList>>,
    /// The lists interned last, newest first.
    recent: VecDeque<Arc<NameList>>,
    /// Entries after the last sweep of dropped ones; the next sweep comes
    /// when a map has doubled, so sweeping costs O(1) per insertion.
    swept_len: usize,
}

impl Interned {
    fn sweep(&mut self) {
        if self.sets.len() + self.lists.len() >= 2 * self.swept_len.max(64) {
            self.sets.retain(|_, w| w.strong_count() > 0);
            self.lists.retain(|_, w| w.strong_count() > 0);
            self.swept_len = self.sets.len() + self.lists.len();
        }
    }
}

impl NameSets {
    pub(super) fn intern(&self, names: BTreeSet<String>) -> Arc<BTreeSet<String>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        names.hash(&mut hasher);
        let key = hasher.finish();
        let mut interned = self.lock();
        if let Some(set) = interned.sets.get(&key).and_then(Weak::upgrade)
            && *set == names
        {
            return set;
        }
        interned.sweep();
        let set = Arc::new(names);
        interned.sets.insert(key, Arc::downgrade(&set));
        set
    }

    /// The list of these bytes (see [`NameList::push`]), built only when no
    /// stream holds it. A name that is not UTF-8 is refused.
    pub(super) fn intern_list(&self, bytes: Vec<u8>) -> Result<Arc<NameList>, Status> {
        if bytes.is_empty() {
            return Ok(Arc::default());
        }
        let key = quick_hash(&bytes);
        let known = self.lock().lists.get(&key).and_then(Weak::upgrade);
        if let Some(list) = known.filter(|l| *l.bytes == *bytes) {
            return Ok(list);
        }
        let set = NameList::names(&bytes)
            .map(|name| {
                std::str::from_utf8(name)
                    .map(str::to_string)
                    .map_err(|_| Status::invalid_argument("a resource name is not valid UTF-8"))
            })
            .collect::<Result<BTreeSet<String>, Status>>()?;
        let list = Arc::new(NameList {
            bytes: bytes.into(),
            set: self.intern(set),
        });
        let mut interned = self.lock();
        interned.sweep();
        interned.lists.insert(key, Arc::downgrade(&list));
        interned.recent.push_front(list.clone());
        interned.recent.truncate(RECENT);
        Ok(list)
    }

    /// The lists interned last, newest first: the likeliest names of a
    /// stream's first request, which every proxy of a scope makes alike.
    pub(super) fn recent(&self) -> Vec<Arc<NameList>> {
        self.lock().recent.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interned> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's names so far, against the lists they may repeat.
#[derive(Default)]
pub(super) struct Matching {
    /// Lists whose first names are the names so far.
    candidates: Vec<Arc<NameList>>,
    /// The length of those first names in each candidate's bytes.
    matched: usize,
    /// The names so far, once they are a prefix of no candidate.
    own: Option<Vec<u8>>,
    /// The name being matched, as a list's bytes hold it.
    entry: Vec<u8>,
}

impl Matching {
    /// Names to be matched against `candidates`; empty lists are no
    /// candidates.
    pub(super) fn new(candidates: impl IntoIterator<Item = Arc<NameList>>) -> Self {
        Self {
            candidates: candidates
                .into_iter()
                .filter(|list| !list.bytes.is_empty())
                .collect(),
            ..Self::default()
        }
    }

    /// The next name.
    pub(super) fn push(&mut self, name: &[u8]) {
        if let Some(own) = &mut self.own {
            NameList::push(own, name);
            return;
        }
        self.entry.clear();
        NameList::push(&mut self.entry, name);
        let (matched, entry) = (self.matched, &self.entry);
        // A list that parts here holds the names so far, should it be the
        // last to go.
        let mut diverged = None;
        self.candidates.retain(|c| {
            let keep = c.bytes[matched..].starts_with(entry);
            if !keep && diverged.is_none() {
                diverged = Some(c.clone());
            }
            keep
        });
        if !self.candidates.is_empty() {
            self.matched += entry.len();
            return;
        }
        let mut own = diverged.map_or_else(Vec::new, |c| c.bytes[..matched].to_vec());
        own.extend_from_slice(entry);
        self.own = Some(own);
    }

    /// The list the names make.
    pub(super) fn finish(self, interned: &NameSets) -> Result<Arc<NameList>, Status> {
        if let Some(own) = self.own {
            return interned.intern_list(own);
        }
        let matched = self.matched;
        match self.candidates.iter().find(|c| c.bytes.len() == matched) {
            Some(list) => Ok(list.clone()),
            None => interned.intern_list(
                self.candidates
                    .first()
                    .map_or_else(Vec::new, |c| c.bytes[..matched].to_vec()),
            ),
        }
    }
}

/// A quick hash of bytes, eight at a time. Not keyed: equal hashes are
/// checked by comparing the bytes.
fn quick_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut words = bytes.chunks_exact(8);
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(names: &[&str]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for name in names {
            NameList::push(&mut bytes, name.as_bytes());
        }
        bytes
    }

    #[test]
    fn a_list_is_interned_once_and_its_set_shared_across_orders() {
        let sets = NameSets::default();
        let ab = sets.intern_list(bytes(&["a", "b"])).unwrap();
        assert!(Arc::ptr_eq(
            &ab,
            &sets.intern_list(bytes(&["a", "b"])).unwrap()
        ));
        let ba = sets.intern_list(bytes(&["b", "a"])).unwrap();
        assert!(!Arc::ptr_eq(&ab, &ba));
        assert!(Arc::ptr_eq(ab.set(), ba.set()));
        assert_eq!(**ab.set(), BTreeSet::from(["a".into(), "b".into()]));
        let recent = sets.recent();
        assert!(Arc::ptr_eq(&recent[0], &ba) && Arc::ptr_eq(&recent[1], &ab));
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused() {
        let mut list = Vec::new();
        NameList::push(&mut list, &[0xff, 0xfe]);
        let status = NameSets::default().intern_list(list).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
