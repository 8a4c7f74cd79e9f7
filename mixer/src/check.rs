//! Check: every rule whose match holds runs its actions, and the first
//! denial decides. The decision says for how long and for how many uses
//! it may be reused, and which attributes (present or absent, and map keys)
//! it depended on, so that a client can cache it for requests that agree
//! on exactly those.

use std::time::Duration;

use mixer_client::attributes::{Bag, Value};

use crate::{
    config::{Adapter, Config, EntryType, ListChecker, Rule, Template},
    expr::{self, EvalError, Referenced},
};

/// How long, and for how many requests, a decision holds when no handler
/// says otherwise.
pub const DEFAULT_VALID_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_VALID_USE_COUNT: i32 = 10_000;

/// google.rpc codes the adapters answer with.
pub const PERMISSION_DENIED: i32 = 7;
pub const FAILED_PRECONDITION: i32 = 9;

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `None`: the request may proceed; else a google.rpc code and message.
    pub denied: Option<(i32, String)>,
    pub valid_duration: Duration,
    pub valid_use_count: i32,
    pub referenced: Referenced,
}

impl Decision {
    fn deny(&mut self, code: i32, message: String) {
        self.denied.get_or_insert((code, message));
    }

    fn limit(&mut self, duration: Option<Duration>, uses: Option<i32>) {
        if let Some(d) = duration {
            self.valid_duration = self.valid_duration.min(d);
        }
        if let Some(n) = uses {
            self.valid_use_count = self.valid_use_count.min(n);
        }
    }
}

pub fn check(config: &Config, bag: &Bag) -> Decision {
    let mut decision = Decision {
        denied: None,
        valid_duration: DEFAULT_VALID_DURATION,
        valid_use_count: DEFAULT_VALID_USE_COUNT,
        referenced: Referenced::default(),
    };
    for rule in &config.rules {
        if decision.denied.is_some() {
            break;
        }
        if !applies(rule, bag, &mut decision.referenced) {
            continue;
        }
        for action in &rule.actions {
            match &action.handler.adapter {
                Adapter::Denier(denier) => {
                    decision.limit(denier.valid_duration, denier.valid_use_count);
                    let message = match denier.status.message.as_str() {
                        "" => format!("denied by {}", action.handler.name),
                        m => m.to_string(),
                    };
                    decision.deny(denier.status.code.unwrap_or(FAILED_PRECONDITION), message);
                }
                // Quotas are answered on their own (`quota`), metrics
                // on Report (`telemetry`).
                Adapter::MemQuota(_) | Adapter::Prometheus(_) | Adapter::Stdio(_) => {}
                Adapter::ListChecker(list) => {
                    decision.limit(list.caching_interval, list.caching_use_count);
                    for instance in &action.instances {
                        let Template::ListEntry { value } = &instance.template else {
                            continue;
                        };
                        match expr::eval(value, bag, &mut decision.referenced) {
                            Ok(value) => {
                                if let Some(refusal) = refuses(list, &value) {
                                    decision.deny(PERMISSION_DENIED, refusal);
                                }
                            }
                            Err(e) => decision.deny(
                                FAILED_PRECONDITION,
                                format!("instance {}: value: {e}", instance.name),
                            ),
                        }
                    }
                }
            }
        }
    }
    decision
}

/// Whether `rule`'s match holds for `bag`; a match over absent attributes
/// does not.
pub(crate) fn applies(rule: &Rule, bag: &Bag, referenced: &mut Referenced) -> bool {
    match &rule.condition {
        None => true,
        Some(condition) => match expr::eval(condition, bag, referenced) {
            Ok(Value::Bool(b)) => b,
            Err(EvalError::Absent(_)) => false,
            other => {
                tracing::warn!(rule = %rule.name, result = ?other, "match not evaluated");
                false
            }
        },
    }
}

/// Why `list` refuses `value`, if it does.
fn refuses(list: &ListChecker, value: &Value) -> Option<String> {
    let text = value.to_string();
    let provided = list
        .provided
        .as_ref()
        .map(|f| f.entries())
        .unwrap_or_default();
    let listed = list
        .overrides
        .iter()
        .chain(provided.iter())
        .any(|entry| match list.entry_type {
            EntryType::Strings => *entry == text,
            EntryType::CaseInsensitiveStrings => entry.eq_ignore_ascii_case(&text),
            EntryType::Regex => regex::Regex::new(entry).is_ok_and(|r| r.is_match(&text)),
            EntryType::IpAddresses => in_range(entry, &text),
        });
    match (list.blacklist, listed) {
        (true, true) => Some(format!("{text} is blacklisted")),
        (false, false) => Some(format!("{text} is not whitelisted")),
        _ => None,
    }
}

/// Whether the address `ip` is `entry`, an address or a CIDR range.
fn in_range(entry: &str, ip: &str) -> bool {
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    let (base, bits) = match entry.split_once('/') {
        Some((base, bits)) => (base, bits.parse::<u32>().ok()),
        None => (entry, None),
    };
    let Ok(base) = base.parse::<std::net::IpAddr>() else {
        return false;
    };
    let to_bits = |a: std::net::IpAddr| -> (u128, u32) {
        match a {
            std::net::IpAddr::V4(v4) => (u32::from(v4) as u128, 32),
            std::net::IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    };
    let ((a, width), (b, base_width)) = (to_bits(ip), to_bits(base));
    if width != base_width {
        return false;
    }
    let bits = bits.unwrap_or(width).min(width);
    let shift = width - bits;
    shift == width || (a >> shift) == (b >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::compile;

    fn bag(pairs: &[(&str, Value)]) -> Bag {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> Value {
        Value::StringMap(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    const DENY_RATINGS_FOR_JASON: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyall, namespace: istio-system}
spec:
  compiledAdapter: denier
  params: {status: {code: 7, message: "not allowed"}, validDuration: 5s, validUseCount: 100}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: denyrequest, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-jason, namespace: istio-system}
spec:
  match: destination.service.host == "ratings.shop.svc.cluster.local" && request.headers["end-user"] == "jason"
  actions: [{handler: denyall, instances: [denyrequest]}]
"#;

    #[test]
    fn a_denier_decides_with_its_status_and_validity() {
        let config = compile(DENY_RATINGS_FOR_JASON);
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let jason = bag(&[
            (
                "destination.service.host",
                Value::String("ratings.shop.svc.cluster.local".into()),
            ),
            (
                "request.headers",
                headers(&[("end-user", "jason"), ("user-agent", "curl")]),
            ),
        ]);
        let decision = check(&config, &jason);
        assert_eq!(decision.denied, Some((7, "not allowed".into())));
        assert_eq!(decision.valid_duration, Duration::from_secs(5));
        assert_eq!(decision.valid_use_count, 100);
        // The decision depends on the host and one header, not on all.
        assert_eq!(
            decision.referenced.present,
            ["destination.service.host".to_string()].into()
        );
        assert_eq!(
            decision.referenced.present_keys,
            [("request.headers".to_string(), "end-user".to_string())].into()
        );

        let other = bag(&[
            (
                "destination.service.host",
                Value::String("ratings.shop.svc.cluster.local".into()),
            ),
            ("request.headers", headers(&[("user-agent", "curl")])),
        ]);
        let decision = check(&config, &other);
        assert_eq!(decision.denied, None);
        assert_eq!(
            decision.referenced.absent_keys,
            [("request.headers".to_string(), "end-user".to_string())].into()
        );
    }

    #[test]
    fn list_checkers_whitelist_blacklist_and_ranges() {
        let config = compile(
            r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: trusted, namespace: istio-system}
spec:
  compiledAdapter: listchecker
  params: {overrides: ["10.1.0.0/16", "192.168.0.7"], entryType: IP_ADDRESSES}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: sourceip, namespace: istio-system}
spec: {compiledTemplate: listentry, params: {value: source.ip}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: trusted-only, namespace: istio-system}
spec: {actions: [{handler: trusted.istio-system, instances: [sourceip]}]}
"#,
        );
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let from = |ip: [u8; 4]| check(&config, &bag(&[("source.ip", Value::Bytes(ip.to_vec()))]));
        assert_eq!(from([10, 1, 200, 3]).denied, None);
        assert_eq!(from([192, 168, 0, 7]).denied, None);
        assert_eq!(
            from([10, 2, 0, 1]).denied,
            Some((PERMISSION_DENIED, "10.2.0.1 is not whitelisted".into()))
        );
    }

    #[test]
    fn problems_name_the_rule_and_the_expression_and_leave_the_rest() {
        let config = compile(&format!(
            r#"{DENY_RATINGS_FOR_JASON}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: broken, namespace: istio-system}}
spec:
  match: source.user == 3
  actions: [{{handler: denyall, instances: [denyrequest]}}]
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: dangling, namespace: istio-system}}
spec:
  actions: [{{handler: nosuch, instances: [denyrequest]}}]
"#
        ));
        assert_eq!(config.rules.len(), 1);
        let problems = config.problems.join("\n");
        assert!(
            problems.contains("rule broken.rule.istio-system: match \"source.user == 3\""),
            "{problems}"
        );
        assert!(problems.contains("STRING with INT64"), "{problems}");
        assert!(
            problems.contains("rule dangling.rule.istio-system: handler \"nosuch\" is not defined"),
            "{problems}"
        );
    }

    #[test]
    fn list_entries_come_from_a_file_too_and_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users.txt");
        std::fs::write(&file, "# blocked users\nmallory\n").unwrap();
        let config = compile(&format!(
            r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {{name: blocked, namespace: istio-system}}
spec:
  compiledAdapter: listchecker
  params: {{blacklist: true, providerUrl: "file://{}", refreshInterval: 0s}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {{name: user, namespace: istio-system}}
spec: {{compiledTemplate: listentry, params: {{value: 'source.user | "nobody"'}}}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {{name: blocked-users, namespace: istio-system}}
spec: {{actions: [{{handler: blocked, instances: [user]}}]}}
"#,
            file.display()
        ));
        assert!(config.problems.is_empty(), "{:?}", config.problems);
        let user = |name: &str| {
            check(
                &config,
                &bag(&[("source.user", Value::String(name.into()))]),
            )
        };
        assert_eq!(
            user("mallory").denied,
            Some((PERMISSION_DENIED, "mallory is blacklisted".into()))
        );
        assert_eq!(user("eve").denied, None);
        std::fs::write(&file, "mallory\neve\n").unwrap();
        assert!(user("eve").denied.is_some(), "the file is read again");

        let missing = compile(&format!(
            "apiVersion: config.istio.io/v1alpha2\nkind: handler\nmetadata: {{name: gone, namespace: istio-system}}\nspec: {{compiledAdapter: listchecker, params: {{providerUrl: \"file://{}/none\"}}}}\n---\napiVersion: config.istio.io/v1alpha2\nkind: rule\nmetadata: {{name: r, namespace: istio-system}}\nspec: {{actions: [{{handler: gone, instances: []}}]}}\n",
            dir.path().display()
        ));
        assert!(
            missing.problems[0].contains("providerUrl"),
            "{:?}",
            missing.problems
        );
    }

    #[test]
    fn ranges() {
        assert!(in_range("10.0.0.0/8", "10.20.30.40"));
        assert!(!in_range("10.0.0.0/8", "11.0.0.1"));
        assert!(in_range("0.0.0.0/0", "1.2.3.4"));
        assert!(in_range("2001:db8::/32", "2001:db8::1"));
        assert!(!in_range("2001:db8::/32", "10.0.0.1"));
    }
}
