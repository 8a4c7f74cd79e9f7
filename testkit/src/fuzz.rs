//! Strategies the fuzz properties share. Byte-level mutation: valid
//! encodings (a CSR's DER, the xDS resources Pilot generates) with bytes
//! flipped, cut, added or truncated, so that inputs reach past the first
//! length check into the decoders and compilers behind it. JSON values
//! made of a vocabulary (the field names and values of a kind of object),
//! so that inputs reach past the first unknown key.

use proptest::{prelude::*, sample::Index};
use serde_json::{Map, Value};

/// A word of `vocabulary` mostly, any string sometimes.
pub fn word(vocabulary: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => prop::sample::select(vocabulary).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// Any JSON value: its keys from `keys`, its strings from `strings`, and
/// beyond them; nested up to five levels.
pub fn json(
    keys: &'static [&'static str],
    strings: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        word(strings).prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((word(keys), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One change to a byte string.
#[derive(Debug, Clone)]
pub enum Edit {
    Flip(Index, u8),
    Cut(Index),
    Insert(Index, u8),
    Truncate(Index),
}

/// One to three edits.
pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<Index>(), 1u8..).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<Index>().prop_map(Edit::Cut),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<Index>().prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 1..4)
}

/// `bytes` with `edits` applied in turn.
pub fn mutated(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for edit in edits {
        match edit {
            Edit::Insert(i, b) => out.insert(i.index(out.len() + 1), *b),
            _ if out.is_empty() => {}
            Edit::Flip(i, b) => {
                let i = i.index(out.len());
                out[i] ^= b;
            }
            Edit::Cut(i) => {
                out.remove(i.index(out.len()));
            }
            Edit::Truncate(i) => out.truncate(i.index(out.len())),
        }
    }
    out
}
