//! Istio 1.1's expression language, for rule matches and instance fields:
//! parsed and type-checked against the attribute manifests when config
//! arrives, evaluated per request while recording which attributes (and
//! map keys) the result depended on, present or absent, so that a client
//! may cache a Check result for requests that agree on exactly those.

mod parse;

use std::collections::BTreeSet;

use mesh_api::pb::istio::policy::v1beta1::ValueType;

pub use self::parse::parse;
use mixer_client::attributes::{Bag, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Const(Value),
    Attr(String),
    Index(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    And,
    Or,
    /// `a | b`: `a`, or `b` when `a` is absent.
    Default,
}

/// Functions: name, argument types, result type (`conditional`, whose
/// types depend on its arguments, is checked on its own).
const FUNCTIONS: &[(&str, &[ValueType], ValueType)] = &[
    (
        "match",
        &[ValueType::String, ValueType::String],
        ValueType::Bool,
    ),
    (
        "startsWith",
        &[ValueType::String, ValueType::String],
        ValueType::Bool,
    ),
    (
        "endsWith",
        &[ValueType::String, ValueType::String],
        ValueType::Bool,
    ),
    ("toLower", &[ValueType::String], ValueType::String),
    ("email", &[ValueType::String], ValueType::EmailAddress),
    ("dnsName", &[ValueType::String], ValueType::DnsName),
    ("uri", &[ValueType::String], ValueType::Uri),
    ("ip", &[ValueType::String], ValueType::IpAddress),
    ("timestamp", &[ValueType::String], ValueType::Timestamp),
    ("emptyStringMap", &[], ValueType::StringMap),
];

fn name(t: ValueType) -> &'static str {
    t.as_str_name()
}

/// A string literal where a DURATION is expected (`response.duration |
/// "0ms"`, as Istio's own config writes) becomes a duration constant;
/// `Ok(true)` when `other` was such a literal and is now one.
fn duration_literal(t: ValueType, other: &mut Expr) -> Result<bool, String> {
    let Expr::Const(Value::String(text)) = other else {
        return Ok(false);
    };
    if t != ValueType::Duration {
        return Ok(false);
    }
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration: {e}"))?;
    *other = Expr::Const(Value::Duration(pbjson_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }));
    Ok(true)
}

/// The type of `expr`, with `types` giving each attribute's; the error
/// names what does not fit. Duration literals written as strings are
/// resolved here.
pub fn check(
    expr: &mut Expr,
    types: &dyn Fn(&str) -> Option<ValueType>,
) -> Result<ValueType, String> {
    let same = |a: ValueType, b: ValueType, what: &str| {
        if a == b {
            Ok(a)
        } else {
            Err(format!("{what} compares {} with {}", name(a), name(b)))
        }
    };
    match expr {
        Expr::Const(v) => Ok(match v {
            Value::String(_) => ValueType::String,
            Value::Int64(_) => ValueType::Int64,
            Value::Double(_) => ValueType::Double,
            Value::Bool(_) => ValueType::Bool,
            Value::Timestamp(_) => ValueType::Timestamp,
            Value::Duration(_) => ValueType::Duration,
            Value::Bytes(_) => ValueType::IpAddress,
            Value::StringMap(_) => ValueType::StringMap,
        }),
        Expr::Attr(a) => types(a).ok_or_else(|| format!("unknown attribute {a:?}")),
        Expr::Index(map, key) => {
            let m = check(map, types)?;
            if m != ValueType::StringMap {
                return Err(format!("only a STRING_MAP can be indexed, not {}", name(m)));
            }
            same(check(key, types)?, ValueType::String, "a map key")?;
            Ok(ValueType::String)
        }
        Expr::Not(e) => same(check(e, types)?, ValueType::Bool, "\"!\""),
        Expr::Binary(op, left, right) => {
            let (mut a, mut b) = (check(left, types)?, check(right, types)?);
            if matches!(op, Op::Eq | Op::Ne | Op::Default) {
                if duration_literal(a, right)? {
                    b = a;
                } else if duration_literal(b, left)? {
                    a = b;
                }
            }
            match op {
                Op::Eq | Op::Ne => same(a, b, "\"==\"/\"!=\"").map(|_| ValueType::Bool),
                Op::And | Op::Or => {
                    same(a, ValueType::Bool, "\"&&\"/\"||\"")?;
                    same(b, ValueType::Bool, "\"&&\"/\"||\"")
                }
                Op::Default => same(a, b, "\"|\""),
            }
        }
        Expr::Call(f, args) if f == "conditional" => {
            let [c, a, b] = &mut args[..] else {
                return Err("conditional takes 3 arguments".into());
            };
            same(check(c, types)?, ValueType::Bool, "conditional's condition")?;
            let (ta, tb) = (check(a, types)?, check(b, types)?);
            if duration_literal(ta, b)? || duration_literal(tb, a)? {
                return Ok(ValueType::Duration);
            }
            same(ta, tb, "conditional")
        }
        Expr::Call(f, args) => {
            let (_, params, result) = FUNCTIONS
                .iter()
                .find(|(n, _, _)| n == f)
                .ok_or_else(|| format!("unknown function {f:?}"))?;
            if params.len() != args.len() {
                return Err(format!(
                    "{f} takes {} arguments, not {}",
                    params.len(),
                    args.len()
                ));
            }
            for (param, arg) in params.iter().zip(args.iter_mut()) {
                let t = check(arg, types)?;
                if t != *param {
                    return Err(format!("{f} takes {}, not {}", name(*param), name(t)));
                }
            }
            Ok(*result)
        }
    }
}

/// What an evaluation read: attributes and map keys, present or absent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Referenced {
    pub present: BTreeSet<String>,
    pub absent: BTreeSet<String>,
    /// `(map attribute, key)`
    pub present_keys: BTreeSet<(String, String)>,
    pub absent_keys: BTreeSet<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// An attribute (or map key) the expression needs is not there.
    #[error("{0} is absent")]
    Absent(String),
    #[error("{0}")]
    Invalid(String),
}

/// Evaluates `expr` over `bag`, adding what it read to `referenced`.
pub fn eval(expr: &Expr, bag: &Bag, referenced: &mut Referenced) -> Result<Value, EvalError> {
    match expr {
        Expr::Const(v) => Ok(v.clone()),
        Expr::Attr(a) => match bag.get(a) {
            Some(v) => {
                referenced.present.insert(a.clone());
                Ok(v.clone())
            }
            None => {
                referenced.absent.insert(a.clone());
                Err(EvalError::Absent(a.clone()))
            }
        },
        Expr::Index(map, key) => {
            let key = string(eval(key, bag, referenced)?)?;
            // A map attribute read by key depends on that key only, not
            // on the whole map: a cache keyed on every header would never
            // hit.
            let map_value = match &**map {
                Expr::Attr(a) => bag.get(a).cloned().ok_or_else(|| {
                    referenced.absent.insert(a.clone());
                    EvalError::Absent(a.clone())
                })?,
                other => eval(other, bag, referenced)?,
            };
            let Value::StringMap(entries) = map_value else {
                return Err(EvalError::Invalid("only a map can be indexed".into()));
            };
            let label = match &**map {
                Expr::Attr(a) => Some(a.clone()),
                _ => None,
            };
            match entries.get(&key) {
                Some(v) => {
                    if let Some(a) = label {
                        referenced.present_keys.insert((a, key));
                    }
                    Ok(Value::String(v.clone()))
                }
                None => {
                    let what = format!("{}[{key:?}]", label.as_deref().unwrap_or("map"));
                    if let Some(a) = label {
                        referenced.absent_keys.insert((a, key));
                    }
                    Err(EvalError::Absent(what))
                }
            }
        }
        Expr::Not(e) => Ok(Value::Bool(!boolean(eval(e, bag, referenced)?)?)),
        Expr::Binary(op, a, b) => match op {
            Op::Eq => Ok(Value::Bool(
                eval(a, bag, referenced)? == eval(b, bag, referenced)?,
            )),
            Op::Ne => Ok(Value::Bool(
                eval(a, bag, referenced)? != eval(b, bag, referenced)?,
            )),
            Op::And => Ok(Value::Bool(
                boolean(eval(a, bag, referenced)?)? && boolean(eval(b, bag, referenced)?)?,
            )),
            Op::Or => Ok(Value::Bool(
                boolean(eval(a, bag, referenced)?)? || boolean(eval(b, bag, referenced)?)?,
            )),
            Op::Default => match eval(a, bag, referenced) {
                Err(EvalError::Absent(_)) => eval(b, bag, referenced),
                other => other,
            },
        },
        Expr::Call(f, args) => call(f, args, bag, referenced),
    }
}

fn string(v: Value) -> Result<String, EvalError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(EvalError::Invalid(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

fn boolean(v: Value) -> Result<bool, EvalError> {
    match v {
        Value::Bool(b) => Ok(b),
        other => Err(EvalError::Invalid(format!(
            "expected a bool, got {other:?}"
        ))),
    }
}

fn call(
    f: &str,
    args: &[Expr],
    bag: &Bag,
    referenced: &mut Referenced,
) -> Result<Value, EvalError> {
    if f == "conditional" {
        let [c, a, b] = args else {
            return Err(EvalError::Invalid("conditional takes 3 arguments".into()));
        };
        let chosen = if boolean(eval(c, bag, referenced)?)? {
            a
        } else {
            b
        };
        return eval(chosen, bag, referenced);
    }
    let mut values = Vec::with_capacity(args.len());
    for arg in args {
        values.push(eval(arg, bag, referenced)?);
    }
    let invalid = |what: String| Err(EvalError::Invalid(what));
    let mut strings = values.into_iter().map(string);
    let mut next = || {
        strings
            .next()
            .unwrap_or_else(|| Err(EvalError::Invalid(format!("{f}: too few arguments"))))
    };
    match f {
        "match" => {
            let (s, pattern) = (next()?, next()?);
            Ok(Value::Bool(glob(&s, &pattern)))
        }
        "startsWith" => {
            let (s, prefix) = (next()?, next()?);
            Ok(Value::Bool(s.starts_with(&prefix)))
        }
        "endsWith" => {
            let (s, suffix) = (next()?, next()?);
            Ok(Value::Bool(s.ends_with(&suffix)))
        }
        "toLower" => Ok(Value::String(next()?.to_lowercase())),
        "email" => {
            let s = next()?;
            match s.split_once('@') {
                Some((user, host)) if !user.is_empty() && !host.is_empty() => Ok(Value::String(s)),
                _ => invalid(format!("{s:?} is not an email address")),
            }
        }
        "dnsName" => {
            let s = next()?;
            let valid = !s.is_empty()
                && s.trim_end_matches('.').split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if valid {
                Ok(Value::String(s))
            } else {
                invalid(format!("{s:?} is not a DNS name"))
            }
        }
        "uri" => {
            let s = next()?;
            match s.split_once(':') {
                Some((scheme, _)) if !scheme.is_empty() => Ok(Value::String(s)),
                _ => invalid(format!("{s:?} is not a URI")),
            }
        }
        "ip" => {
            let s = next()?;
            match s.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => Ok(Value::Bytes(ip.octets().to_vec())),
                Ok(std::net::IpAddr::V6(ip)) => Ok(Value::Bytes(ip.octets().to_vec())),
                Err(_) => invalid(format!("{s:?} is not an IP address")),
            }
        }
        "timestamp" => {
            let s = next()?;
            let time = humantime::parse_rfc3339(&s)
                .map_err(|e| EvalError::Invalid(format!("{s:?} is not an RFC 3339 time: {e}")))?;
            let since = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| EvalError::Invalid(format!("{s:?} is before 1970")))?;
            Ok(Value::Timestamp(pbjson_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }))
        }
        "emptyStringMap" => Ok(Value::StringMap(Default::default())),
        other => invalid(format!("unknown function {other:?}")),
    }
}

/// Evaluates labels (an instance's dimensions) to their text.
pub fn eval_labels(
    dimensions: &std::collections::BTreeMap<String, Expr>,
    bag: &Bag,
    referenced: &mut Referenced,
) -> Result<std::collections::BTreeMap<String, String>, EvalError> {
    dimensions
        .iter()
        .map(|(name, e)| Ok((name.clone(), eval(e, bag, referenced)?.to_string())))
        .collect()
}

/// Istio's `match`: `*` alone matches all, a leading or trailing `*`
/// matches a suffix or prefix, anything else must be equal.
fn glob(s: &str, pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return s.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return s.ends_with(suffix);
    }
    s == pattern
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    fn types() -> HashMap<&'static str, ValueType> {
        HashMap::from([
            ("request.path", ValueType::String),
            ("request.headers", ValueType::StringMap),
            ("source.ip", ValueType::IpAddress),
            ("response.code", ValueType::Int64),
            ("source.user", ValueType::String),
            ("connection.mtls", ValueType::Bool),
            ("response.duration", ValueType::Duration),
        ])
    }

    fn checked(text: &str) -> Result<ValueType, String> {
        let types = types();
        check(&mut parse(text)?, &|a| types.get(a).copied())
    }

    fn bag() -> Bag {
        Bag::from([
            ("request.path".into(), Value::String("/reviews/1".into())),
            (
                "request.headers".into(),
                Value::StringMap(BTreeMap::from([("x-user".into(), "jason".into())])),
            ),
            ("source.ip".into(), Value::Bytes(vec![10, 0, 0, 7])),
            ("response.code".into(), Value::Int64(200)),
        ])
    }

    fn run(text: &str) -> (Result<Value, EvalError>, Referenced) {
        let mut referenced = Referenced::default();
        let value = eval(&parse(text).unwrap(), &bag(), &mut referenced);
        (value, referenced)
    }

    #[test]
    fn types_are_checked_with_the_reason() {
        assert_eq!(
            checked(r#"request.headers["x-user"] == "jason""#),
            Ok(ValueType::Bool)
        );
        assert_eq!(
            checked(r#"source.user | "anonymous""#),
            Ok(ValueType::String)
        );
        assert_eq!(
            checked(r#"source.ip == ip("10.0.0.7")"#),
            Ok(ValueType::Bool)
        );
        assert_eq!(
            checked("conditional(connection.mtls, 1, response.code)"),
            Ok(ValueType::Int64)
        );
        for (text, error) in [
            (r#"response.code == "200""#, "compares INT64 with STRING"),
            ("request.path && true", "STRING"),
            (
                "no.such.attribute",
                "unknown attribute \"no.such.attribute\"",
            ),
            (r#"request.path["x"]"#, "only a STRING_MAP can be indexed"),
            ("startsWith(request.path)", "startsWith takes 2 arguments"),
            ("lower(request.path)", "unknown function \"lower\""),
        ] {
            let got = checked(text).unwrap_err();
            assert!(got.contains(error), "{text}: {got}");
        }
    }

    #[test]
    fn evaluation_records_what_was_read() {
        let (value, referenced) =
            run(r#"request.headers["x-user"] == "jason" && request.path.startsWith("/reviews")"#);
        assert_eq!(value, Ok(Value::Bool(true)));
        assert_eq!(referenced.present, BTreeSet::from(["request.path".into()]));
        assert_eq!(
            referenced.present_keys,
            BTreeSet::from([("request.headers".into(), "x-user".into())])
        );

        // Absent attributes and keys are recorded too: a request that has
        // them may be decided otherwise.
        let (value, referenced) = run(r#"source.user | request.headers["x-group"] | "anonymous""#);
        assert_eq!(value, Ok(Value::String("anonymous".into())));
        assert_eq!(referenced.absent, BTreeSet::from(["source.user".into()]));
        assert_eq!(
            referenced.absent_keys,
            BTreeSet::from([("request.headers".into(), "x-group".into())])
        );

        // Short circuits read only what they evaluate.
        let (_, referenced) = run(r#"response.code == 500 && source.user == "x""#);
        assert!(referenced.absent.is_empty());
    }

    #[test]
    fn functions() {
        for (text, expected) in [
            (r#"match(request.path, "/reviews*")"#, true),
            (
                r#"match("reviews.shop.svc.cluster.local", "*.shop.svc.cluster.local")"#,
                true,
            ),
            (r#"match(request.path, "/ratings*")"#, false),
            (r#"request.path.endsWith("/1")"#, true),
            (r#"source.ip == ip("10.0.0.7")"#, true),
            (r#"toLower("ABC") == "abc""#, true),
            (
                r#"conditional(response.code == 200, "ok", "fail") == "ok""#,
                true,
            ),
            (r#"emptyStringMap() == emptyStringMap()"#, true),
            (
                r#"timestamp("2026-11-22T06:00:00Z") == timestamp("2026-11-22T06:00:00.000Z")"#,
                true,
            ),
            (r#"email("a@b.example") == "a@b.example""#, true),
        ] {
            assert_eq!(run(text).0, Ok(Value::Bool(expected)), "{text}");
        }
        for text in [
            r#"ip("ten")"#,
            r#"email("nobody")"#,
            r#"dnsName("a..b")"#,
            r#"timestamp("yesterday")"#,
        ] {
            assert!(matches!(run(text).0, Err(EvalError::Invalid(_))), "{text}");
        }
        assert_eq!(
            run("source.user").0,
            Err(EvalError::Absent("source.user".into()))
        );
    }
}
