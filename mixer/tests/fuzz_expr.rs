//! The expression language fuzzed: any text, and token soups that reach
//! deep into the grammar, parse to an expression or an error, and any
//! expression evaluates to a value or an error against any bag. Never a
//! panic: rule matches and instance fields come from users' config and
//! bags from any proxy.

use mixer::expr::{Referenced, eval, parse};
use mixer_client::attributes::{Bag, Value};
use proptest::prelude::*;

/// Attribute names, both in expressions and in the bags they meet.
const NAMES: &[&str] = &[
    "a",
    "b.c",
    "request.headers",
    "source.ip",
    "request.time",
    "response.duration",
];

/// The rest of Istio's expression syntax, with edge values.
const TOKENS: &[&str] = &[
    "\"s\"",
    "\"\"",
    "'x'",
    "1",
    "-1",
    "9223372036854775807",
    "9223372036854775808",
    "1.5",
    "1e309",
    "true",
    "false",
    "(",
    ")",
    "[",
    "]",
    "==",
    "!=",
    "&&",
    "||",
    "!",
    "|",
    ",",
    ".",
    "match(",
    "ip(",
    "dnsName(",
    "email(",
    "uri(",
    "timestamp(",
    "emptyStringMap()",
    "conditional(",
    "startsWith(",
    "endsWith(",
    "reverse(",
    "toLower(",
    "size(",
    "\"10.0.0.1\"",
    "\"2020-01-01T00:00:00Z\"",
    "\"99999-01-01T00:00:00Z\"",
    "\"1970\"",
    "\"5s\"",
    "\"*\"",
    "\"a*\"",
    "\\",
    "\"\\u{0}\"",
    "\u{feff}",
    "💥",
];

fn bag() -> impl Strategy<Value = Bag> {
    let value = prop_oneof![
        any::<String>().prop_map(Value::String),
        any::<i64>().prop_map(Value::Int64),
        any::<f64>().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Bool),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Value::Timestamp(
            pbjson_types::Timestamp { seconds, nanos }
        )),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Value::Duration(
            pbjson_types::Duration { seconds, nanos }
        )),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Bytes),
        proptest::collection::btree_map(any::<String>(), any::<String>(), 0..4)
            .prop_map(Value::StringMap),
    ];
    let name = prop::sample::select(NAMES).prop_map(str::to_string);
    proptest::collection::btree_map(name, value, 0..6)
}

fn soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![prop::sample::select(NAMES), prop::sample::select(TOKENS)];
    proptest::collection::vec(token, 0..24).prop_map(|t| t.join(" "))
}

/// Expressions built by the grammar, so that most parse and evaluation is
/// reached: attributes and literals, combined by operators, defaults,
/// indexing and the functions.
fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            "a",
            "b.c",
            "request.headers",
            "source.ip",
            "request.time",
            "response.duration"
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z0-9*./:-]{0,12}".prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop::sample::select(vec!["==", "!=", "&&", "||", "|"]),
                inner.clone()
            )
                .prop_map(|(l, op, r)| format!("({l} {op} {r})")),
            inner.clone().prop_map(|e| format!("!{e}")),
            (inner.clone(), inner.clone()).prop_map(|(m, k)| format!("{m}[{k}]")),
            (
                prop::sample::select(vec![
                    "match",
                    "ip",
                    "dnsName",
                    "email",
                    "uri",
                    "timestamp",
                    "conditional",
                    "startsWith",
                    "endsWith",
                    "toLower",
                    "size",
                    "reverse",
                ]),
                proptest::collection::vec(inner, 0..4),
            )
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
        ]
    })
}

proptest! {
    #[test]
    fn any_grammatical_expression_evaluates_or_is_refused(text in expression(), bag in bag()) {
        if let Ok(expr) = parse(&text) {
            let mut referenced = Referenced::default();
            if let Ok(value) = eval(&expr, &bag, &mut referenced) {
                let _ = value.to_string();
            }
        }
    }

    #[test]
    fn any_text_parses_or_is_refused(text in any::<String>()) {
        let _ = parse(&text);
    }

    #[test]
    fn any_parsed_expression_evaluates_or_is_refused(text in soup(), bag in bag()) {
        if let Ok(expr) = parse(&text) {
            let mut referenced = Referenced::default();
            if let Ok(value) = eval(&expr, &bag, &mut referenced) {
                // A value, whatever it holds, reads as text.
                let _ = value.to_string();
            }
        }
    }
}
