//! Mixer's config, compiled from what Galley serves: attribute types from
//! the attribute manifests; rules, each match type-checked; the handlers
//! and instances rules name, their expressions type-checked too. A rule
//! with a problem is reported, naming the rule and the expression, and its
//! last good version stays in force (or none, for a new rule); the other
//! rules apply.

use std::{collections::HashMap, sync::Arc, time::Duration};

use mcp::SinkSnapshot;
use mesh_api::{
    kinds::{self, Body},
    pb::istio::policy::v1beta1::{self as policy, ValueType},
    policy as names, wkt,
};
use serde::Deserialize;

use crate::expr::{self, Expr};

/// A compiled config.
#[derive(Default)]
pub struct Config {
    pub types: HashMap<String, ValueType>,
    pub rules: Vec<Arc<Rule>>,
    /// What was left out, and why.
    pub problems: Vec<String>,
}

pub struct Rule {
    /// `namespace/name`.
    pub name: String,
    /// `None`: every request.
    pub condition: Option<Expr>,
    pub actions: Vec<Action>,
}

pub struct Action {
    pub handler: Arc<Handler>,
    pub instances: Vec<Arc<Instance>>,
}

pub struct Handler {
    /// The full name, `name.handler.namespace`.
    pub name: String,
    pub adapter: Adapter,
}

/// The adapters Mixer runs in its own process.
pub enum Adapter {
    Denier(Denier),
    ListChecker(ListChecker),
    MemQuota(MemQuota),
    Prometheus(Prometheus),
    Stdio(Stdio),
}

impl Adapter {
    /// The instances the params name by full name: a prometheus metric's
    /// `instance_name`, a memquota limit's `name`.
    fn instances_named(&self) -> Vec<&str> {
        match self {
            Self::Prometheus(p) => p.metrics.iter().map(|m| m.instance_name.as_str()).collect(),
            Self::MemQuota(q) => q.quotas.iter().map(|q| q.name.as_str()).collect(),
            Self::Denier(_) | Self::ListChecker(_) | Self::Stdio(_) => Vec::new(),
        }
    }
}

/// Log entries written as lines, JSON with `outputAsJson`, else
/// `key=value` pairs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stdio {
    #[serde(alias = "output_as_json")]
    #[serde(default)]
    pub output_as_json: bool,
}

/// Metrics exported in the Prometheus format, each fed by one metric
/// instance (`instanceName`, the instance's full name
/// `name.instance.namespace`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prometheus {
    #[serde(default)]
    pub metrics: Vec<MetricInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricInfo {
    /// Exported as `istio_<name>`.
    pub name: String,
    #[serde(alias = "instance_name")]
    pub instance_name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kind: MetricKind,
    #[serde(alias = "label_names")]
    #[serde(default)]
    pub label_names: Vec<String>,
    #[serde(default)]
    pub buckets: Option<Buckets>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MetricKind {
    #[default]
    Counter,
    Gauge,
    Distribution,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Buckets {
    #[serde(alias = "explicit_buckets")]
    ExplicitBuckets { bounds: Vec<f64> },
    #[serde(rename_all = "camelCase", alias = "linear_buckets")]
    LinearBuckets {
        #[serde(alias = "num_finite_buckets")]
        num_finite_buckets: f64,
        width: f64,
        #[serde(default)]
        offset: f64,
    },
    #[serde(rename_all = "camelCase", alias = "exponential_buckets")]
    ExponentialBuckets {
        #[serde(alias = "num_finite_buckets")]
        num_finite_buckets: f64,
        #[serde(alias = "growth_factor")]
        growth_factor: f64,
        scale: f64,
    },
}

impl Buckets {
    /// The upper bounds of the buckets, as Istio's prometheus adapter
    /// makes them: linear and exponential ones start at `offset` and
    /// `scale`, with one bound more than `numFiniteBuckets`.
    pub fn bounds(&self) -> Vec<f64> {
        match self {
            Self::ExplicitBuckets { bounds } => bounds.clone(),
            Self::LinearBuckets {
                num_finite_buckets,
                width,
                offset,
            } => (0..=*num_finite_buckets as u32)
                .map(|i| offset + width * f64::from(i))
                .collect(),
            Self::ExponentialBuckets {
                num_finite_buckets,
                growth_factor,
                scale,
            } => (0..=*num_finite_buckets as i32)
                .map(|i| scale * growth_factor.powi(i))
                .collect(),
        }
    }
}

/// Rate limits kept in Mixer's memory: per quota (by instance name), at
/// most `maxAmount` in any `validDuration`, per distinct set of dimension
/// values; an override sets other limits for the dimensions it names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemQuota {
    #[serde(default)]
    pub quotas: Vec<QuotaLimit>,
    /// How long a Check's answer is kept for retries with its
    /// `deduplication_id`; [`MemQuota::deduplication_window`].
    #[serde(alias = "min_deduplication_duration")]
    #[serde(default, with = "humantime_serde_opt")]
    pub min_deduplication_duration: Option<Duration>,
}

impl MemQuota {
    /// `minDeduplicationDuration`, 1 s when not set.
    pub fn deduplication_window(&self) -> Duration {
        self.min_deduplication_duration
            .unwrap_or(Duration::from_secs(1))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaLimit {
    pub name: String,
    #[serde(alias = "max_amount")]
    #[serde(default, deserialize_with = "whole")]
    pub max_amount: Option<i64>,
    /// `None`: allocations never expire.
    #[serde(alias = "valid_duration")]
    #[serde(default, with = "humantime_serde_opt")]
    pub valid_duration: Option<Duration>,
    #[serde(default)]
    pub overrides: Vec<QuotaOverride>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaOverride {
    #[serde(default)]
    pub dimensions: std::collections::BTreeMap<String, String>,
    #[serde(alias = "max_amount")]
    #[serde(default, deserialize_with = "whole")]
    pub max_amount: Option<i64>,
    #[serde(alias = "valid_duration")]
    #[serde(default, with = "humantime_serde_opt")]
    pub valid_duration: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Denier {
    #[serde(default)]
    pub status: DenierStatus,
    #[serde(alias = "valid_duration")]
    #[serde(default, with = "humantime_serde_opt")]
    pub valid_duration: Option<Duration>,
    #[serde(alias = "valid_use_count")]
    #[serde(default, deserialize_with = "whole")]
    pub valid_use_count: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DenierStatus {
    /// A google.rpc.Code; the denier's default is FAILED_PRECONDITION.
    #[serde(default, deserialize_with = "whole")]
    pub code: Option<i32>,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListChecker {
    #[serde(default)]
    pub overrides: Vec<String>,
    /// Entries on the list are refused (else: only they are allowed).
    #[serde(default)]
    pub blacklist: bool,
    #[serde(alias = "entry_type")]
    #[serde(default)]
    pub entry_type: EntryType,
    #[serde(alias = "caching_interval")]
    #[serde(default, with = "humantime_serde_opt")]
    pub caching_interval: Option<Duration>,
    #[serde(alias = "caching_use_count")]
    #[serde(default, deserialize_with = "whole")]
    pub caching_use_count: Option<i32>,
    /// More entries, one a line, from a file (`file:///path` or a path).
    #[serde(alias = "provider_url")]
    #[serde(default)]
    pub provider_url: Option<String>,
    /// How often the file is read again.
    #[serde(alias = "refresh_interval")]
    #[serde(default, with = "humantime_serde_opt")]
    pub refresh_interval: Option<Duration>,
    #[serde(skip)]
    pub provided: Option<Arc<ListFile>>,
}

/// A list checker's entries from a file, read again when `refresh` has
/// passed; a read that fails keeps the last entries.
#[derive(Debug)]
pub struct ListFile {
    path: std::path::PathBuf,
    refresh: Duration,
    read: std::sync::Mutex<(std::time::Instant, Arc<Vec<String>>)>,
}

impl ListFile {
    fn open(url: &str, refresh: Duration) -> Result<Self, String> {
        let path = match url.strip_prefix("file://") {
            Some(path) => path,
            None if url.starts_with('/') => url,
            None => {
                return Err(format!(
                    "providerUrl {url:?}: only file:// lists are supported"
                ));
            }
        };
        let path = std::path::PathBuf::from(path);
        let entries = Self::load(&path)?;
        Ok(Self {
            path,
            refresh,
            read: std::sync::Mutex::new((std::time::Instant::now(), Arc::new(entries))),
        })
    }

    fn load(path: &std::path::Path) -> Result<Vec<String>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("providerUrl {}: {e}", path.display()))?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    /// The entries, read again when they are older than the refresh
    /// interval.
    pub fn entries(&self) -> Arc<Vec<String>> {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if read.0.elapsed() >= self.refresh {
            match Self::load(&self.path) {
                Ok(entries) => *read = (std::time::Instant::now(), Arc::new(entries)),
                Err(e) => {
                    tracing::warn!("list not refreshed, the last entries stay: {e}");
                    read.0 = std::time::Instant::now();
                }
            }
        }
        read.1.clone()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EntryType {
    #[default]
    Strings,
    CaseInsensitiveStrings,
    IpAddresses,
    Regex,
}

/// An integer from params, where every number is a protobuf `Struct`
/// double.
fn whole<'de, D: serde::Deserializer<'de>, T: TryFrom<i64>>(d: D) -> Result<Option<T>, D::Error> {
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => T::try_from(n as i64)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{n} is out of range"))),
        Some(n) => Err(serde::de::Error::custom(format!(
            "{n} is not a whole number"
        ))),
    }
}

/// Durations as Istio writes them in params: `"5s"`, `"100ms"`.
mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

pub struct Instance {
    /// The full name, `name.instance.namespace`.
    pub name: String,
    /// The object's own name, by which a Check asks for a quota.
    pub short_name: String,
    pub template: Template,
}

/// The templates whose instances Mixer builds.
pub enum Template {
    /// No fields: the action alone decides (the denier's template).
    CheckNothing,
    /// `value`: what a list checker looks up.
    ListEntry { value: Expr },
    /// What a quota is counted by.
    Quota {
        dimensions: std::collections::BTreeMap<String, Expr>,
    },
    /// A log entry's variables, severity and time.
    LogEntry {
        variables: std::collections::BTreeMap<String, Expr>,
        severity: Option<Expr>,
        timestamp: Option<Expr>,
    },
    /// A number to record, and its labels.
    Metric {
        value: Expr,
        dimensions: std::collections::BTreeMap<String, Expr>,
    },
}

fn params_json(params: &Option<pbjson_types::Struct>) -> serde_json::Value {
    params
        .as_ref()
        .and_then(|p| serde_json::to_value(p).ok())
        .unwrap_or_else(|| serde_json::json!({}))
}

impl Config {
    /// The config of `snapshot`; where a rule has a problem, its version
    /// in `previous` is kept.
    pub fn from_snapshot(snapshot: &SinkSnapshot, previous: &Config) -> Self {
        let collect = |collection| {
            snapshot
                .bodies(collection)
                .map(|(ns, name, body)| (ns, name, body.clone()))
                .collect::<Vec<_>>()
        };
        let of_kind = |collection, kind: &'static str| {
            snapshot
                .bodies(collection)
                .map(move |(ns, name, body)| (ns, name, kind, body.clone()))
        };
        // Istio 1.1's own config writes handlers and instances in the
        // legacy per-adapter and per-template kinds (`kind: prometheus`,
        // `kind: metric`): the spec is the params, the kind the adapter or
        // template.
        let legacy = |run: &'static [&'static str], read: fn(&'static str, wkt::Struct) -> Body| {
            kinds::KINDS
                .iter()
                .filter(move |k| k.body == kinds::BodyType::LegacyStruct && run.contains(&k.kind))
                .flat_map(|k| of_kind(k.collection, k.kind))
                .filter_map(move |(ns, name, kind, body)| match body {
                    Body::LegacyStruct(params) => Some((ns, name, kind, read(kind, *params))),
                    _ => None,
                })
        };
        let handlers = of_kind(kinds::HANDLERS, names::HANDLER)
            .chain(legacy(names::ADAPTERS, |adapter, params| {
                Body::Handler(Box::new(policy::Handler {
                    compiled_adapter: adapter.into(),
                    params: Some(params),
                    ..Default::default()
                }))
            }))
            .collect::<Vec<_>>();
        let instances = of_kind(kinds::INSTANCES, names::INSTANCE)
            .chain(legacy(names::TEMPLATES, |template, params| {
                Body::Instance(Box::new(policy::Instance {
                    compiled_template: template.into(),
                    params: Some(params),
                    ..Default::default()
                }))
            }))
            .collect::<Vec<_>>();
        Self::compile(
            &collect(kinds::ATTRIBUTE_MANIFESTS),
            &collect(kinds::RULES),
            &handlers,
            &instances,
            previous,
        )
    }

    /// Compiles objects given as `(namespace, name, body)`, handlers and
    /// instances as `(namespace, name, kind, body)`; a rule with a problem
    /// keeps its version in `previous`.
    fn compile(
        manifests: &[(String, String, Body)],
        rules: &[(String, String, Body)],
        handlers: &[(String, String, &str, Body)],
        instances: &[(String, String, &str, Body)],
        previous: &Config,
    ) -> Self {
        let mut config = Config::default();
        for (_, _, body) in manifests {
            if let Body::AttributeManifest(m) = body {
                for (name, info) in &m.attributes {
                    let t = ValueType::try_from(info.value_type).unwrap_or(ValueType::Unspecified);
                    config.types.insert(name.clone(), t);
                }
            }
        }
        // By full name (`name.kind.namespace`), as rules and adapters name them.
        let mut compiled_instances: HashMap<String, Result<Arc<Instance>, String>> = HashMap::new();
        for (ns, name, kind, body) in instances {
            if let Body::Instance(i) = body {
                let key = names::full_name(name, kind, ns);
                let compiled = compile_instance(&key, name, i, &config.types).map(Arc::new);
                compiled_instances.insert(key, compiled);
            }
        }
        let mut compiled_handlers: HashMap<String, Result<Arc<Handler>, String>> = HashMap::new();
        for (ns, name, kind, body) in handlers {
            if let Body::Handler(h) = body {
                let key = names::full_name(name, kind, ns);
                let compiled = compile_handler(&key, h);
                if let Ok(handler) = &compiled {
                    for instance in handler.adapter.instances_named() {
                        if !compiled_instances.contains_key(instance) {
                            config.problems.push(format!(
                                "handler {key}: no instance {instance:?} exists, so nothing reaches it \
                                 (instances are named name.kind.namespace)"
                            ));
                        }
                    }
                }
                compiled_handlers.insert(key, compiled.map(Arc::new));
            }
        }
        for (ns, name, body) in rules {
            let Body::Rule(rule) = body else { continue };
            let key = names::full_name(name, "rule", ns);
            match compile_rule(
                &key,
                ns,
                rule,
                &config.types,
                &compiled_handlers,
                &compiled_instances,
            ) {
                Ok(rule) => config.rules.push(Arc::new(rule)),
                Err(problem) => {
                    let kept = previous.rules.iter().find(|r| r.name == key);
                    let outcome = match kept {
                        Some(rule) => {
                            config.rules.push(rule.clone());
                            "its last good version stays in force"
                        }
                        None => "left out",
                    };
                    tracing::warn!(rule = %key, "{problem}; {outcome}");
                    config
                        .problems
                        .push(format!("rule {key}: {problem}; {outcome}"));
                }
            }
        }
        config
    }
}

fn compile_handler(key: &str, h: &policy::Handler) -> Result<Handler, String> {
    let adapter = if h.compiled_adapter.is_empty() {
        &h.adapter
    } else {
        &h.compiled_adapter
    };
    let params = params_json(&h.params);
    let parse_error = |e: serde_json::Error| format!("handler {key}: params of {adapter}: {e}");
    let adapter = match adapter.as_str() {
        "denier" => Adapter::Denier(serde_json::from_value(params).map_err(parse_error)?),
        "memquota" => Adapter::MemQuota(serde_json::from_value(params).map_err(parse_error)?),
        "prometheus" => Adapter::Prometheus(serde_json::from_value(params).map_err(parse_error)?),
        "stdio" => Adapter::Stdio(serde_json::from_value(params).map_err(parse_error)?),
        "listchecker" => {
            let mut list: ListChecker = serde_json::from_value(params).map_err(parse_error)?;
            if let Some(url) = &list.provider_url {
                let refresh = list.refresh_interval.unwrap_or(Duration::from_secs(60));
                let file =
                    ListFile::open(url, refresh).map_err(|e| format!("handler {key}: {e}"))?;
                list.provided = Some(Arc::new(file));
            }
            if list.entry_type == EntryType::Regex {
                let provided = list
                    .provided
                    .as_ref()
                    .map(|f| f.entries())
                    .unwrap_or_default();
                for pattern in list.overrides.iter().chain(provided.iter()) {
                    regex::Regex::new(pattern)
                        .map_err(|e| format!("handler {key}: override {pattern:?}: {e}"))?;
                }
            }
            Adapter::ListChecker(list)
        }
        other => return Err(format!("handler {key}: adapter {other:?} is not supported")),
    };
    Ok(Handler {
        name: key.to_string(),
        adapter,
    })
}

fn compile_instance(
    key: &str,
    short_name: &str,
    i: &policy::Instance,
    types: &HashMap<String, ValueType>,
) -> Result<Instance, String> {
    let template = if i.compiled_template.is_empty() {
        &i.template
    } else {
        &i.compiled_template
    };
    let params = params_json(&i.params);
    let field = |name: &str, want: ValueType| -> Result<Expr, String> {
        let text = params[name]
            .as_str()
            .ok_or_else(|| format!("instance {key}: {template} needs {name:?}"))?;
        let mut parsed =
            expr::parse(text).map_err(|e| format!("instance {key}: {name}: {text:?}: {e}"))?;
        let t = expr::check(&mut parsed, &|a| types.get(a).copied())
            .map_err(|e| format!("instance {key}: {name}: {text:?}: {e}"))?;
        if t != want && !(want == ValueType::String && is_stringish(t)) {
            return Err(format!(
                "instance {key}: {name}: {text:?} is {}, not {}",
                t.as_str_name(),
                want.as_str_name()
            ));
        }
        Ok(parsed)
    };
    let template = match template.as_str() {
        "checknothing" => Template::CheckNothing,
        "listentry" => Template::ListEntry {
            value: field("value", ValueType::String)?,
        },
        "quota" => Template::Quota {
            dimensions: dimensions(key, &params, "dimensions", types)?,
        },
        "logentry" => {
            let optional = |name: &str, want: ValueType| {
                params
                    .get(name)
                    .is_some()
                    .then(|| field(name, want))
                    .transpose()
            };
            Template::LogEntry {
                variables: dimensions(key, &params, "variables", types)?,
                severity: optional("severity", ValueType::String)?,
                timestamp: optional("timestamp", ValueType::Timestamp)?,
            }
        }
        "metric" => {
            let text = params["value"]
                .as_str()
                .ok_or_else(|| format!("instance {key}: metric needs \"value\""))?;
            let mut value =
                expr::parse(text).map_err(|e| format!("instance {key}: value: {text:?}: {e}"))?;
            let t = expr::check(&mut value, &|a| types.get(a).copied())
                .map_err(|e| format!("instance {key}: value: {text:?}: {e}"))?;
            if !matches!(
                t,
                ValueType::Int64 | ValueType::Double | ValueType::Duration
            ) {
                return Err(format!(
                    "instance {key}: value: {text:?} is {}, not a number or a duration",
                    t.as_str_name()
                ));
            }
            Template::Metric {
                value,
                dimensions: dimensions(key, &params, "dimensions", types)?,
            }
        }
        other => {
            return Err(format!(
                "instance {key}: template {other:?} is not supported"
            ));
        }
    };
    Ok(Instance {
        name: key.to_string(),
        short_name: short_name.to_string(),
        template,
    })
}

/// A map of expressions in an instance's params (`dimensions`,
/// `variables`), each parsed and type-checked.
fn dimensions(
    key: &str,
    params: &serde_json::Value,
    field: &str,
    types: &HashMap<String, ValueType>,
) -> Result<std::collections::BTreeMap<String, Expr>, String> {
    let mut dimensions = std::collections::BTreeMap::new();
    for (name, text) in params[field].as_object().into_iter().flatten() {
        let text = text
            .as_str()
            .ok_or_else(|| format!("instance {key}: {field}.{name} is not an expression"))?;
        let mut parsed = expr::parse(text)
            .map_err(|e| format!("instance {key}: {field}.{name}: {text:?}: {e}"))?;
        expr::check(&mut parsed, &|a| types.get(a).copied())
            .map_err(|e| format!("instance {key}: {field}.{name}: {text:?}: {e}"))?;
        dimensions.insert(name.clone(), parsed);
    }
    Ok(dimensions)
}

/// Types a list entry may be: every value that has a string form.
fn is_stringish(t: ValueType) -> bool {
    matches!(
        t,
        ValueType::IpAddress | ValueType::EmailAddress | ValueType::Uri | ValueType::DnsName
    )
}

fn compile_rule(
    key: &str,
    namespace: &str,
    rule: &policy::Rule,
    types: &HashMap<String, ValueType>,
    handlers: &HashMap<String, Result<Arc<Handler>, String>>,
    instances: &HashMap<String, Result<Arc<Instance>, String>>,
) -> Result<Rule, String> {
    let condition = match rule.r#match.trim() {
        "" => None,
        text => {
            let mut parsed = expr::parse(text).map_err(|e| format!("match {text:?}: {e}"))?;
            let t = expr::check(&mut parsed, &|a| types.get(a).copied())
                .map_err(|e| format!("match {text:?}: {e}"))?;
            if t != ValueType::Bool {
                return Err(format!("match {text:?} is {}, not BOOL", t.as_str_name()));
            }
            Some(parsed)
        }
    };
    let mut actions = Vec::new();
    for action in &rule.actions {
        let handler = match names::resolve(&action.handler, names::HANDLER, namespace, |n| {
            handlers.get(n)
        }) {
            Some((_, Ok(h))) => h.clone(),
            Some((_, Err(problem))) => return Err(problem.clone()),
            None => return Err(format!("handler {:?} is not defined", action.handler)),
        };
        let mut resolved = Vec::new();
        for reference in &action.instances {
            match names::resolve(reference, names::INSTANCE, namespace, |n| instances.get(n)) {
                Some((_, Ok(i))) => resolved.push(i.clone()),
                Some((_, Err(problem))) => return Err(problem.clone()),
                None => return Err(format!("instance {reference:?} is not defined")),
            }
        }
        actions.push(Action {
            handler,
            instances: resolved,
        });
    }
    Ok(Rule {
        name: key.to_string(),
        condition,
        actions,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mesh_api::object::ConfigObject;

    const MANIFEST: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: attributemanifest
metadata: {name: kubernetes, namespace: istio-system}
spec:
  attributes:
    source.labels: {valueType: STRING_MAP}
    source.ip: {valueType: IP_ADDRESS}
    request.headers: {valueType: STRING_MAP}
    destination.service.host: {valueType: STRING}
    source.user: {valueType: STRING}
    context.protocol: {valueType: STRING}
    response.code: {valueType: INT64}
    response.duration: {valueType: DURATION}
"#;

    /// A config compiled from `yaml` and a manifest of the attributes the
    /// tests use.
    /// The config of `yaml` (after the test manifest), as Mixer compiles
    /// what its MCP sink holds.
    pub fn compile(yaml: &str) -> Config {
        let objects =
            ConfigObject::parse_yaml(&format!("{MANIFEST}---\n{yaml}"), "test.yaml").unwrap();
        Config::from_snapshot(&SinkSnapshot::from_objects(objects), &Config::default())
    }

    /// Galley warns about the adapters and templates outside
    /// `mesh_api::policy`'s lists; this Mixer must run exactly those.
    #[test]
    fn the_adapters_and_templates_run_are_those_galley_is_told_of() {
        let unsupported =
            |result: Result<(), String>| result.is_err_and(|e| e.contains("is not supported"));
        let handler = |adapter: &str| policy::Handler {
            compiled_adapter: adapter.into(),
            ..Default::default()
        };
        let instance = |template: &str| policy::Instance {
            compiled_template: template.into(),
            ..Default::default()
        };
        let types = HashMap::new();
        for adapter in names::ADAPTERS {
            let compiled = compile_handler("h", &handler(adapter)).map(|_| ());
            assert!(!unsupported(compiled), "{adapter}");
        }
        for template in names::TEMPLATES {
            let compiled = compile_instance("i", "i", &instance(template), &types).map(|_| ());
            assert!(!unsupported(compiled), "{template}");
        }
        assert!(unsupported(
            compile_handler("h", &handler("opa")).map(|_| ())
        ));
        let tracespan = compile_instance("i", "i", &instance("tracespan"), &types);
        assert!(unsupported(tracespan.map(|_| ())));
    }
}
