//! Byte-level mutation for the fuzz properties: valid encodings (a CSR's
//! DER, the xDS resources Pilot generates) with bytes flipped, cut, added
//! or truncated, so that inputs reach past the first length check into
//! the decoders and compilers behind it.

use proptest::{prelude::*, sample::Index};

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
