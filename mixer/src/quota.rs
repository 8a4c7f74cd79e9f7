//! Quotas. A Check may ask for amounts of named quotas; rules whose match
//! holds and whose memquota handler counts that quota's instance decide
//! how much is granted. Allocations are kept in memory per handler, quota
//! and dimension values, over a sliding window, and outlive config
//! changes. A quota no handler counts is granted in full. A Check sent
//! again with the same `deduplication_id` (a client's retry) gets the
//! first answer again, not a second allocation, for the handlers'
//! `minDeduplicationDuration`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use mixer_client::attributes::Bag;

use crate::{
    check::{DEFAULT_VALID_DURATION, applies},
    config::{Adapter, Config, QuotaLimit, Template},
    expr::{self, Referenced},
};

/// What was granted, for how long, and what deciding it read.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub granted: i64,
    pub valid_duration: Duration,
    pub referenced: Referenced,
}

/// What a Check asks of one quota.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The quota's name as the request gives it.
    pub quota: &'a str,
    pub amount: i64,
    pub best_effort: bool,
    /// The request's id; empty for none.
    pub deduplication_id: &'a str,
}

/// Allocations by handler, quota and dimension values.
#[derive(Default)]
pub struct QuotaStore {
    allocations: Mutex<HashMap<String, VecDeque<(Instant, i64)>>>,
    /// Grants by quota and deduplication id, with when they are forgotten.
    answered: Mutex<HashMap<(String, String), (Instant, Grant)>>,
}

/// Stale answers are swept once this many are held.
const ANSWERS_SWEPT_AT: usize = 4096;

impl QuotaStore {
    fn answered(&self, ask: &Ask, now: Instant) -> Option<Grant> {
        let answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        let key = (ask.quota.to_string(), ask.deduplication_id.to_string());
        answered
            .get(&key)
            .filter(|(until, _)| now < *until)
            .map(|(_, grant)| grant.clone())
    }

    fn remember(&self, ask: &Ask, grant: &Grant, until: Instant, now: Instant) {
        let mut answered = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if answered.len() >= ANSWERS_SWEPT_AT {
            answered.retain(|_, (until, _)| now < *until);
        }
        let key = (ask.quota.to_string(), ask.deduplication_id.to_string());
        answered.insert(key, (until, grant.clone()));
    }

    /// Takes up to `amount` (all of it or nothing unless `best_effort`)
    /// of `max` in the window; returns what was taken.
    fn take(
        &self,
        key: String,
        amount: i64,
        best_effort: bool,
        max: i64,
        window: Option<Duration>,
        now: Instant,
    ) -> i64 {
        let mut allocations = self.allocations.lock().unwrap_or_else(|e| e.into_inner());
        let log = allocations.entry(key).or_default();
        if let Some(window) = window {
            while log
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) >= window)
            {
                log.pop_front();
            }
        }
        let available = (max - log.iter().map(|(_, n)| n).sum::<i64>()).max(0);
        let taken = match (best_effort, available >= amount) {
            (_, true) => amount,
            (true, false) => available,
            (false, false) => 0,
        };
        if taken > 0 {
            log.push_back((now, taken));
        }
        taken
    }
}

/// Allocates what `ask` asks for `bag`.
pub fn allocate(config: &Config, bag: &Bag, ask: &Ask, store: &QuotaStore, now: Instant) -> Grant {
    let deduplicated = !ask.deduplication_id.is_empty();
    if deduplicated && let Some(grant) = store.answered(ask, now) {
        return grant;
    }
    let mut grant = Grant {
        granted: ask.amount,
        valid_duration: DEFAULT_VALID_DURATION,
        referenced: Referenced::default(),
    };
    let mut remembered_for = Duration::ZERO;
    for rule in &config.rules {
        let counting: Vec<_> = rule
            .actions
            .iter()
            .filter_map(|action| match &action.handler.adapter {
                Adapter::MemQuota(memquota) => Some((action, memquota)),
                _ => None,
            })
            .flat_map(|(action, memquota)| {
                action
                    .instances
                    .iter()
                    .filter(|i| mesh_api::policy::asks_for(ask.quota, &i.short_name))
                    .map(move |i| (action, memquota, i))
            })
            .collect();
        if counting.is_empty() || !applies(rule, bag, &mut grant.referenced) {
            continue;
        }
        for (action, memquota, instance) in counting {
            let Template::Quota { dimensions } = &instance.template else {
                continue;
            };
            let Some(limit) = memquota.quotas.iter().find(|q| q.name == instance.name) else {
                continue;
            };
            let values = match expr::eval_labels(dimensions, bag, &mut grant.referenced) {
                Ok(values) => values,
                Err(e) => {
                    tracing::warn!(instance = %instance.name, "quota dimensions not evaluated: {e}");
                    grant.granted = 0;
                    continue;
                }
            };
            let (max, window) = limits(limit, &values);
            let key = format!("{}\u{0}{}\u{0}{values:?}", action.handler.name, limit.name);
            let taken = store.take(key, ask.amount, ask.best_effort, max, window, now);
            remembered_for = remembered_for.max(memquota.deduplication_window());
            grant.granted = grant.granted.min(taken);
            if let Some(window) = window {
                grant.valid_duration = grant.valid_duration.min(window);
            }
        }
    }
    if deduplicated && !remembered_for.is_zero() {
        store.remember(ask, &grant, now + remembered_for, now);
    }
    grant
}

/// The limit and window for these dimension values: the first override
/// whose dimensions all match, else the quota's own.
fn limits(limit: &QuotaLimit, values: &BTreeMap<String, String>) -> (i64, Option<Duration>) {
    let own = (limit.max_amount.unwrap_or(0), limit.valid_duration);
    limit
        .overrides
        .iter()
        .find(|o| o.dimensions.iter().all(|(k, v)| values.get(k) == Some(v)))
        .map_or(own, |o| {
            (o.max_amount.unwrap_or(own.0), o.valid_duration.or(own.1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::compile;
    use mixer_client::attributes::Value;

    const RATINGS_QUOTA: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quotahandler, namespace: istio-system}
spec:
  compiledAdapter: memquota
  params:
    quotas:
    - name: requestcount.instance.istio-system
      maxAmount: 3
      validDuration: 1s
      overrides:
      - {dimensions: {source: reviews}, maxAmount: 1}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: quota
  params:
    dimensions: {source: 'source.labels["app"] | "unknown"', destination: destination.service.host}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec:
  actions: [{handler: quotahandler, instances: [requestcount]}]
"#;

    fn from(app: &str) -> Bag {
        Bag::from([
            (
                "source.labels".into(),
                Value::StringMap([("app".to_string(), app.to_string())].into()),
            ),
            (
                "destination.service.host".into(),
                Value::String("ratings.shop.svc.cluster.local".into()),
            ),
        ])
    }

    #[test]
    fn memquota_limits_per_dimensions_with_overrides_and_windows() {
        let config = compile(RATINGS_QUOTA);
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let store = QuotaStore::default();
        let start = Instant::now();
        let ask = |bag: &Bag, amount: i64, best_effort: bool, at: Duration| {
            let ask = Ask {
                quota: "requestcount",
                amount,
                best_effort,
                deduplication_id: "",
            };
            allocate(&config, bag, &ask, &store, start + at)
        };
        let t0 = Duration::ZERO;
        // productpage: 3 a second.
        assert_eq!(ask(&from("productpage"), 2, false, t0).granted, 2);
        assert_eq!(
            ask(&from("productpage"), 2, false, t0).granted,
            0,
            "all or nothing"
        );
        assert_eq!(
            ask(&from("productpage"), 2, true, t0).granted,
            1,
            "best effort"
        );
        // reviews is overridden to 1, counted apart.
        assert_eq!(ask(&from("reviews"), 1, false, t0).granted, 1);
        assert_eq!(ask(&from("reviews"), 1, false, t0).granted, 0);
        // A window later, there is quota again.
        let later = ask(&from("reviews"), 1, false, Duration::from_millis(1_001));
        assert_eq!(later.granted, 1);
        assert_eq!(later.valid_duration, Duration::from_secs(1));
        assert!(
            later
                .referenced
                .present_keys
                .contains(&("source.labels".to_string(), "app".to_string()))
        );
        // A quota nobody counts is granted in full.
        let ask = Ask {
            quota: "other",
            amount: 7,
            best_effort: false,
            deduplication_id: "",
        };
        let other = allocate(&config, &from("x"), &ask, &store, start);
        assert_eq!(other.granted, 7);
    }

    #[test]
    fn a_retried_check_gets_its_first_answer_for_the_deduplication_window() {
        let config = compile(
            &RATINGS_QUOTA
                .replace("validDuration: 1s", "validDuration: 10s")
                .replace(
                    "    quotas:",
                    "    minDeduplicationDuration: 100ms\n    quotas:",
                ),
        );
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let (store, start) = (QuotaStore::default(), Instant::now());
        let ask = |id: &str, at: u64| {
            let ask = Ask {
                quota: "requestcount",
                amount: 2,
                best_effort: false,
                deduplication_id: id,
            };
            let now = start + Duration::from_millis(at);
            allocate(&config, &from("productpage"), &ask, &store, now).granted
        };
        assert_eq!(ask("a", 0), 2);
        assert_eq!(ask("a", 50), 2);
        // Another request: 2 more of 3 is too many.
        assert_eq!(ask("b", 50), 0);
        // Past the window, "a" is a new request too.
        assert_eq!(ask("a", 200), 0);
    }
}
