//! What Galley tells operators about the config it read: metrics, and the
//! `/debug/config` page with every current problem and what is served.

use std::sync::{Arc, Mutex};

use component::Admin;
use mcp::Store;
use mesh_api::kinds;
use mesh_api::object::Limit;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use serde_json::json;

use crate::config_set::LoadReport;

/// Records each load of the config directory.
#[derive(Clone)]
pub struct ConfigStatus {
    last: Arc<Mutex<LoadReport>>,
    /// The mesh config file's warnings, kept apart: it loads on its own.
    mesh_config: Arc<Mutex<Vec<String>>>,
    /// A relay's objects shadowed by the primary's (see `relay`).
    relay: Arc<Mutex<Vec<String>>>,
    loads: Counter,
    problems: Gauge,
    warnings: Gauge,
    rejected: Gauge,
    over_limit: Family<LimitLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

impl ConfigStatus {
    /// Registers the metrics and the `/debug/config` page.
    pub fn register(admin: &Admin, store: Arc<Store>) -> Self {
        let status = Self {
            last: Arc::default(),
            mesh_config: Arc::default(),
            relay: Arc::default(),
            loads: Counter::default(),
            problems: Gauge::default(),
            warnings: Gauge::default(),
            rejected: Gauge::default(),
            over_limit: Family::default(),
        };
        {
            let mut registry = admin.registry();
            registry.register(
                "config_loads",
                "Reads of the config directory",
                status.loads.clone(),
            );
            registry.register(
                "config_problems",
                "Problems found by the last read (parse, validation, duplicates)",
                status.problems.clone(),
            );
            registry.register(
                "config_warnings",
                "Things served but not honoured after the last read (ignored fields, kinds only Istio's own components run)",
                status.warnings.clone(),
            );
            registry.register(
                "config_files_over_limit",
                "Files the last read refused whole for breaking a bound (--max-file-documents, --max-file-bytes, --max-yaml-depth)",
                status.over_limit.clone(),
            );
            registry.register(
                "config_rejected_objects",
                "Objects not served as written after the last read",
                status.rejected.clone(),
            );
        }
        let (last, mesh_config, relay) = (
            status.last.clone(),
            status.mesh_config.clone(),
            status.relay.clone(),
        );
        admin.debug_page("config", move || {
            let report = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mesh_config = mesh_config
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let relay = relay.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let served: serde_json::Map<_, _> = kinds::KINDS
                .iter()
                .filter(|k| store.len(k.collection) > 0)
                .map(|k| (k.collection.to_string(), json!(store.len(k.collection))))
                .collect();
            json!({
                "problems": report.errors,
                "warnings": report.warnings.iter().chain(&mesh_config).chain(&relay).collect::<Vec<_>>(),
                "rejected_objects": report.rejected,
                "served": served,
            })
        });
        status
    }

    pub fn record(&self, report: &LoadReport) {
        self.loads.inc();
        self.problems.set(report.errors.len() as i64);
        self.rejected.set(report.rejected as i64);
        for limit in [Limit::Documents, Limit::Bytes, Limit::Depth] {
            let files = report.exceeded.iter().filter(|l| **l == limit).count();
            self.over_limit
                .get_or_create(&LimitLabel {
                    limit: limit.name(),
                })
                .set(files as i64);
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = report.clone();
        self.count_warnings();
    }

    /// Records the mesh config file's warnings.
    pub fn record_mesh_config(&self, warnings: Vec<String>) {
        *self.mesh_config.lock().unwrap_or_else(|e| e.into_inner()) = warnings;
        self.count_warnings();
    }

    /// Records a relay's objects that the primary's shadow.
    pub fn record_relay(&self, warnings: Vec<String>) {
        *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = warnings;
        self.count_warnings();
    }

    fn count_warnings(&self) {
        let config = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warnings
            .len();
        let len = |w: &Mutex<Vec<String>>| w.lock().unwrap_or_else(|e| e.into_inner()).len();
        self.warnings
            .set((config + len(&self.mesh_config) + len(&self.relay)) as i64);
    }
}
