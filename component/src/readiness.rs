//! Readiness as a set of named conditions. A component is ready when every
//! condition it registered holds; `/ready` names the ones that do not, so an
//! operator sees *why* a component is not ready.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// One condition of a [`Readiness`]; starts unmet.
#[derive(Clone)]
pub struct Condition {
    name: String,
    conditions: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a condition that starts unmet.
    pub fn condition(&self, name: impl Into<String>) -> Condition {
        let name = name.into();
        lock(&self.conditions).insert(name.clone(), false);
        Condition {
            name,
            conditions: self.conditions.clone(),
        }
    }

    /// The names of the conditions that are not met, empty when ready.
    pub fn unmet(&self) -> Vec<String> {
        lock(&self.conditions)
            .iter()
            .filter(|(_, met)| !**met)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl Condition {
    pub fn set(&self, met: bool) {
        lock(&self.conditions).insert(self.name.clone(), met);
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
    }
}
