//! Attribute decoding fuzzed: any bytes on the wire, and any well-formed
//! `CompressedAttributes` whose indices point anywhere (into the global
//! dictionary, the message's own words, or nowhere), decode to a bag or an
//! error; every value in a bag reads as text. Check and Report bodies come
//! from any proxy.

use mesh_api::pb::istio::mixer::v1::{CompressedAttributes, ReportRequest, StringMap};
use mixer_client::attributes::{decode, decode_report};
use proptest::prelude::*;
use prost::Message;

/// Indices around both ends of the global dictionary (221 words) and of a
/// message's own words (negative), and far out.
fn index() -> impl Strategy<Value = i32> {
    prop_oneof![-8i32..230, Just(i32::MIN), Just(i32::MAX), any::<i32>()]
}

/// A map of a few indices to values of `value`.
fn map<V: std::fmt::Debug>(
    value: impl Strategy<Value = V>,
) -> impl Strategy<Value = std::collections::BTreeMap<i32, V>> {
    proptest::collection::btree_map(index(), value, 0..4)
}

fn attributes() -> impl Strategy<Value = CompressedAttributes> {
    (
        proptest::collection::vec(any::<String>(), 0..4),
        map(index()),
        map(any::<i64>()),
        map(any::<f64>()),
        map(any::<bool>()),
        map((any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| pbjson_types::Timestamp { seconds, nanos })),
        map((any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| pbjson_types::Duration { seconds, nanos })),
        map(proptest::collection::vec(any::<u8>(), 0..17).prop_map(Into::into)),
        map(proptest::collection::btree_map(index(), index(), 0..3)
            .prop_map(|entries| StringMap { entries })),
    )
        .prop_map(
            |(
                words,
                strings,
                int64s,
                doubles,
                bools,
                timestamps,
                durations,
                bytes,
                string_maps,
            )| {
                CompressedAttributes {
                    words,
                    strings,
                    int64s,
                    doubles,
                    bools,
                    timestamps,
                    durations,
                    bytes,
                    string_maps,
                }
            },
        )
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512), global in 0u32..300) {
        if let Ok(attributes) = CompressedAttributes::decode(bytes.as_slice())
            && let Ok(bag) = decode(&attributes, &attributes.words, global)
        {
            bag.values().for_each(|v| { let _ = v.to_string(); });
        }
        if let Ok(report) = ReportRequest::decode(bytes.as_slice()) {
            let _ = decode_report(&report);
        }
    }

    #[test]
    fn any_indices_decode_or_are_refused(attributes in attributes(), global in prop_oneof![Just(221u32), 0u32..300]) {
        if let Ok(bag) = decode(&attributes, &attributes.words, global) {
            bag.values().for_each(|v| { let _ = v.to_string(); });
        }
    }

    #[test]
    fn any_report_of_deltas_decodes_or_is_refused(
        messages in proptest::collection::vec(attributes(), 0..4),
        words in proptest::collection::vec(any::<String>(), 0..4),
        global in 0u32..300,
        semantics in 0i32..3,
    ) {
        let report = ReportRequest {
            attributes: messages,
            default_words: words,
            global_word_count: global,
            repeated_attributes_semantics: semantics,
        };
        if let Ok(bags) = decode_report(&report) {
            bags.iter().flat_map(|b| b.values()).for_each(|v| { let _ = v.to_string(); });
        }
    }
}
