//! Readiness as a set of named conditions. A component is ready when every
//! condition it registered holds; `/ready` names the ones that do not, so an
//! operator sees *why* a component is not ready.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<String, State>>>,
}

#[derive(Clone, Default)]
struct State {
    met: bool,
    /// What an operator should know about the condition even when it
    /// holds (a source that serves less than was asked, say).
    note: Option<String>,
}

/// One condition of a [`Readiness`]; starts unmet.
#[derive(Clone)]
pub struct Condition {
    name: String,
    conditions: Arc<Mutex<BTreeMap<String, State>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a condition that starts unmet.
    pub fn condition(&self, name: impl Into<String>) -> Condition {
        let name = name.into();
        lock(&self.conditions).insert(name.clone(), State::default());
        Condition {
            name,
            conditions: self.conditions.clone(),
        }
    }

    /// The names of the conditions that are not met, empty when ready.
    pub fn unmet(&self) -> Vec<String> {
        lock(&self.conditions)
            .iter()
            .filter(|(_, state)| !state.met)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `name: note` for every condition with a note.
    pub fn notes(&self) -> Vec<String> {
        lock(&self.conditions)
            .iter()
            .filter_map(|(name, state)| Some(format!("{name}: {}", state.note.as_ref()?)))
            .collect()
    }
}

impl Condition {
    pub fn set(&self, met: bool) {
        lock(&self.conditions)
            .entry(self.name.clone())
            .or_default()
            .met = met;
    }

    pub fn note(&self, note: Option<String>) {
        lock(&self.conditions)
            .entry(self.name.clone())
            .or_default()
            .note = note;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map of booleans is still a consistent map of booleans.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let readiness = Readiness::new();
        assert!(readiness.unmet().is_empty());
        let synced = readiness.condition("mcp-synced");
        let certs = readiness.condition("certificates");
        assert_eq!(readiness.unmet(), ["certificates", "mcp-synced"]);
        synced.set(true);
        assert_eq!(readiness.unmet(), ["certificates"]);
        certs.set(true);
        assert!(readiness.unmet().is_empty());
        synced.set(false);
        assert!(!readiness.unmet().is_empty());
        synced.note(Some("one collection absent".into()));
        assert_eq!(readiness.notes(), ["mcp-synced: one collection absent"]);
        synced.note(None);
        assert!(readiness.notes().is_empty());
    }
}
