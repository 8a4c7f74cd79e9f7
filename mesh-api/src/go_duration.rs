//! Istio's YAML writes durations the Go way (`5m`, `1h30m`, `1.5s`, `250ms`),
//! while proto3 JSON only knows seconds (`300s`). Before a spec is parsed,
//! every string in a `google.protobuf.Duration` field is rewritten to the
//! proto3 form, guided by the message descriptors compiled into this crate.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::Value;

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"))[..])
        .expect("descriptors compiled by build.rs decode")
});

const DURATION: &str = "google.protobuf.Duration";

/// Rewrites Go-style durations in `json`, a JSON form of `message`
/// (a full protobuf name). Values that are not Go durations are left for
/// the parser to reject with its own error.
pub fn normalize(message: &str, json: &mut Value) {
    if let Some(descriptor) = POOL.get_message_by_name(message) {
        normalize_message(&descriptor, json);
    }
}

fn normalize_message(message: &MessageDescriptor, json: &mut Value) {
    let Value::Object(fields) = json else { return };
    for (key, value) in fields.iter_mut() {
        let field = message
            .get_field_by_json_name(key)
            .or_else(|| message.get_field_by_name(key));
        if let Some(field) = field {
            normalize_field(&field, value);
        }
    }
}

fn normalize_field(field: &FieldDescriptor, value: &mut Value) {
    let Kind::Message(message) = field.kind() else {
        return;
    };
    if field.is_map() {
        let map_value = message.map_entry_value_field();
        if let Value::Object(entries) = value {
            entries
                .values_mut()
                .for_each(|v| normalize_single(&map_value, v));
        }
    } else if field.is_list() {
        if let Value::Array(items) = value {
            items.iter_mut().for_each(|v| normalize_single(field, v));
        }
    } else {
        normalize_single(field, value);
    }
}

fn normalize_single(field: &FieldDescriptor, value: &mut Value) {
    let Kind::Message(message) = field.kind() else {
        return;
    };
    if message.full_name() == DURATION {
        if let Value::String(s) = value
            && let Some(proto) = to_proto3(s)
        {
            *s = proto;
        }
    } else {
        normalize_message(&message, value);
    }
}

/// `1h30m` -> `5400s`, `1.5s` -> `1.500000000s`; `None` if `s` is not a Go
/// duration.
fn to_proto3(s: &str) -> Option<String> {
    let (negative, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    match rest {
        "" => return None,
        "0" => return Some("0s".into()),
        _ => {}
    }
    let mut nanos: i128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() {
            return None;
        }
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        nanos = nanos.checked_add(whole.checked_mul(scale)?)?;
        let mut place = scale;
        for digit in fraction.chars() {
            place /= 10;
            nanos += i128::from(digit.to_digit(10)?) * place;
        }
        rest = tail;
    }
    let sign = if negative { "-" } else { "" };
    let (secs, sub) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
    Some(if sub == 0 {
        format!("{sign}{secs}s")
    } else {
        format!("{sign}{secs}.{sub:09}s")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_become_proto3_seconds() {
        for (go, proto) in [
            ("5m", "300s"),
            ("1h30m", "5400s"),
            ("1m0s", "60s"),
            ("2.5s", "2.500000000s"),
            ("250ms", "0.250000000s"),
            ("1.5h", "5400s"),
            ("10us", "0.000010000s"),
            ("-3s", "-3s"),
            ("0", "0s"),
            ("30s", "30s"),
        ] {
            assert_eq!(to_proto3(go).as_deref(), Some(proto), "{go}");
        }
        for bad in ["", "5", "5x", "h", "1..5s", "soon"] {
            assert_eq!(to_proto3(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_duration_fields_are_rewritten() {
        let mut json = serde_json::json!({
            "hosts": ["5m"],
            "http": [{"timeout": "5m", "retries": {"perTryTimeout": "250ms"}, "corsPolicy": {"maxAge": "24h"}}],
        });
        normalize("istio.networking.v1alpha3.VirtualService", &mut json);
        assert_eq!(json["hosts"][0], "5m");
        assert_eq!(json["http"][0]["timeout"], "300s");
        assert_eq!(json["http"][0]["retries"]["perTryTimeout"], "0.250000000s");
        assert_eq!(json["http"][0]["corsPolicy"]["maxAge"], "86400s");
    }
}
