//! Attributes: what a proxy tells Mixer about a request, as typed values by
//! name. On the wire they are `CompressedAttributes`: names and string
//! values are word indices, into Istio's global dictionary when `>= 0` and
//! into the message's own words when `< 0` (`-1` is the first).

pub mod dictionary;

use std::collections::{BTreeMap, HashMap};

use mesh_api::pb::istio::mixer::v1::{CompressedAttributes, ReportRequest, StringMap};
use pbjson_types::{Duration, Timestamp};

use self::dictionary::{GLOBAL_WORDS, global_index};

/// One attribute's value, of one of Istio's attribute types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Int64(i64),
    Double(f64),
    Bool(bool),
    Timestamp(Timestamp),
    Duration(Duration),
    Bytes(Vec<u8>),
    StringMap(BTreeMap<String, String>),
}

/// The value as text: for list lookups and metric labels. Addresses (4 or
/// 16 bytes) read as IP addresses.
impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::String(s) => f.write_str(s),
            Value::Int64(n) => write!(f, "{n}"),
            Value::Double(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Timestamp(t) => match rfc3339(t) {
                Some(text) => f.write_str(&text),
                // Any value can come in a Report: text, never a panic.
                None => write!(f, "{}s+{}ns since 1970", t.seconds, t.nanos),
            },
            Value::Duration(d) => {
                let negative = d.seconds < 0 || d.nanos < 0;
                let length = std::time::Duration::new(
                    d.seconds.unsigned_abs(),
                    d.nanos.unsigned_abs().min(999_999_999),
                );
                let sign = if negative { "-" } else { "" };
                write!(f, "{sign}{}", humantime::format_duration(length))
            }
            Value::Bytes(b) => match b.len() {
                4 => write!(
                    f,
                    "{}",
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&b[..]).unwrap_or_default())
                ),
                16 => write!(
                    f,
                    "{}",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[..]).unwrap_or_default())
                ),
                _ => b.iter().try_for_each(|byte| write!(f, "{byte:02x}")),
            },
            Value::StringMap(m) => {
                let pairs: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                f.write_str(&pairs.join(","))
            }
        }
    }
}

/// Latest instant RFC 3339 writes: 9999-12-31T23:59:59.999999999Z.
const MAX_RFC3339_SECONDS: i64 = 253_402_300_799;

/// A timestamp in RFC 3339, or `None` outside 1970 to 9999 (or with
/// nanoseconds out of range), which the formatter cannot write.
fn rfc3339(t: &Timestamp) -> Option<String> {
    let seconds = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    if t.seconds > MAX_RFC3339_SECONDS {
        return None;
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::new(seconds, nanos);
    Some(humantime::format_rfc3339_nanos(time).to_string())
}

/// Attributes by name.
pub type Bag = BTreeMap<String, Value>;

/// Why a message's attributes could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

/// The words a message's indices refer to.
struct Words<'a> {
    global: &'a [&'static str],
    local: &'a [String],
}

impl<'a> Words<'a> {
    /// `global_word_count` is how much of the global dictionary the sender
    /// knows; 0 means all of it. A sender that knows more words than Mixer
    /// cannot be understood.
    fn new(local: &'a [String], global_word_count: u32) -> Result<Self, DecodeError> {
        let count = match global_word_count as usize {
            0 => GLOBAL_WORDS.len(),
            n if n > GLOBAL_WORDS.len() => {
                return Err(DecodeError(format!(
                    "global_word_count {n} is beyond the {} words of Istio 1.1's dictionary",
                    GLOBAL_WORDS.len()
                )));
            }
            n => n,
        };
        Ok(Self {
            global: &GLOBAL_WORDS[..count],
            local,
        })
    }

    fn get(&self, index: i32, what: &str) -> Result<&'a str, DecodeError> {
        let word = if index >= 0 {
            self.global.get(index as usize).copied()
        } else {
            self.local
                .get((-(index as i64) - 1) as usize)
                .map(String::as_str)
        };
        word.ok_or_else(|| {
            DecodeError(format!(
                "{what} index {index} names no word ({} global words, {} in the message)",
                self.global.len(),
                self.local.len()
            ))
        })
    }
}

/// Decodes one message's attributes; `words` are its own words.
pub fn decode(
    attributes: &CompressedAttributes,
    words: &[String],
    global_word_count: u32,
) -> Result<Bag, DecodeError> {
    let words = Words::new(words, global_word_count)?;
    let mut bag = Bag::new();
    decode_into(attributes, &words, &mut bag)?;
    Ok(bag)
}

fn decode_into(
    attributes: &CompressedAttributes,
    words: &Words<'_>,
    bag: &mut Bag,
) -> Result<(), DecodeError> {
    let name = |i: &i32| words.get(*i, "attribute name").map(str::to_string);
    for (n, v) in &attributes.strings {
        let value = words.get(*v, "string value")?;
        bag.insert(name(n)?, Value::String(value.into()));
    }
    for (n, v) in &attributes.int64s {
        bag.insert(name(n)?, Value::Int64(*v));
    }
    for (n, v) in &attributes.doubles {
        bag.insert(name(n)?, Value::Double(*v));
    }
    for (n, v) in &attributes.bools {
        bag.insert(name(n)?, Value::Bool(*v));
    }
    for (n, v) in &attributes.timestamps {
        bag.insert(name(n)?, Value::Timestamp(*v));
    }
    for (n, v) in &attributes.durations {
        bag.insert(name(n)?, Value::Duration(*v));
    }
    for (n, v) in &attributes.bytes {
        bag.insert(name(n)?, Value::Bytes(v.clone()));
    }
    for (n, map) in &attributes.string_maps {
        let entries = map
            .entries
            .iter()
            .map(|(k, v)| {
                Ok((
                    words.get(*k, "string map key")?.to_string(),
                    words.get(*v, "string map value")?.to_string(),
                ))
            })
            .collect::<Result<_, DecodeError>>()?;
        bag.insert(name(n)?, Value::StringMap(entries));
    }
    Ok(())
}

/// The attribute bags of a Report, one per entry. With delta encoding each
/// entry holds only what changed from the bag before it; an entry without
/// words of its own uses the request's `default_words`.
pub fn decode_report(request: &ReportRequest) -> Result<Vec<Bag>, DecodeError> {
    let delta = request.repeated_attributes_semantics
        == mesh_api::pb::istio::mixer::v1::report_request::RepeatedAttributesSemantics::DeltaEncoding
            as i32;
    let mut bags: Vec<Bag> = Vec::with_capacity(request.attributes.len());
    for (i, attributes) in request.attributes.iter().enumerate() {
        let own = if attributes.words.is_empty() {
            &request.default_words
        } else {
            &attributes.words
        };
        let words = Words::new(own, request.global_word_count)?;
        let mut bag = match bags.last() {
            Some(previous) if delta => previous.clone(),
            _ => Bag::new(),
        };
        decode_into(attributes, &words, &mut bag)
            .map_err(|DecodeError(e)| DecodeError(format!("report entry {i}: {e}")))?;
        bags.push(bag);
    }
    Ok(bags)
}

/// Builds one message's `CompressedAttributes`: words of the global
/// dictionary that the reader knows by their index, others added to the
/// message's own words.
pub struct Compressor {
    words: Vec<String>,
    local: HashMap<String, i32>,
    /// How many global words the reader knows.
    global_words: usize,
}

impl Default for Compressor {
    /// For a reader that knows all of Istio 1.1's dictionary.
    fn default() -> Self {
        Self::for_reader(GLOBAL_WORDS.len() as u32)
    }
}

impl Compressor {
    /// For a reader that knows the first `global_word_count` global words,
    /// as a request's sender declares. Istio's `mixc` declares none and
    /// reads a response by its own words alone, so a Mixer answer uses
    /// global indices only below the request's count, as `mixs` does.
    pub fn for_reader(global_word_count: u32) -> Self {
        Self {
            words: Vec::new(),
            local: HashMap::new(),
            global_words: global_word_count as usize,
        }
    }

    /// The index of `word`: its global one if the reader knows it, or its
    /// place among the message's words (added when new).
    pub fn index(&mut self, word: &str) -> i32 {
        if let Some(i) = global_index(word).filter(|i| *i < self.global_words) {
            return i as i32;
        }
        if let Some(i) = self.local.get(word) {
            return *i;
        }
        let i = -(self.words.len() as i32) - 1;
        self.local.insert(word.to_string(), i);
        self.words.push(word.to_string());
        i
    }

    /// `bag`, compressed; its words are in the message (and kept for the
    /// next bag of the same message, as a Report's default words).
    pub fn compress(&mut self, bag: &Bag) -> CompressedAttributes {
        self.compress_some(bag)
    }

    /// Some attributes, compressed as [`Compressor::compress`] does a bag:
    /// a Report's delta, say, without copying it into a bag first.
    pub fn compress_some<'a>(
        &mut self,
        attributes: impl IntoIterator<Item = (&'a String, &'a Value)>,
    ) -> CompressedAttributes {
        let mut out = CompressedAttributes::default();
        for (name, value) in attributes {
            let n = self.index(name);
            match value {
                Value::String(s) => {
                    let v = self.index(s);
                    out.strings.insert(n, v);
                }
                Value::Int64(v) => {
                    out.int64s.insert(n, *v);
                }
                Value::Double(v) => {
                    out.doubles.insert(n, *v);
                }
                Value::Bool(v) => {
                    out.bools.insert(n, *v);
                }
                Value::Timestamp(v) => {
                    out.timestamps.insert(n, *v);
                }
                Value::Duration(v) => {
                    out.durations.insert(n, *v);
                }
                Value::Bytes(v) => {
                    out.bytes.insert(n, v.clone());
                }
                Value::StringMap(map) => {
                    let entries = map
                        .iter()
                        .map(|(k, v)| (self.index(k), self.index(v)))
                        .collect();
                    out.string_maps.insert(n, StringMap { entries });
                }
            }
        }
        out
    }

    /// The message's own words, in index order (`-1` first).
    pub fn into_words(self) -> Vec<String> {
        self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::pb::istio::mixer::v1::report_request::RepeatedAttributesSemantics;

    #[test]
    fn any_timestamp_or_duration_reads_as_text() {
        let at = |seconds, nanos| Value::Timestamp(Timestamp { seconds, nanos }).to_string();
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            at(253_402_300_799, 999_999_999),
            "9999-12-31T23:59:59.999999999Z"
        );
        // What a Report may carry and no clock can: named, not formatted.
        for (seconds, nanos) in [
            (i64::MAX, 0),
            (i64::MIN, 0),
            (-1, 0),
            (0, -1),
            (0, i32::MAX),
            (253_402_300_800, 0),
        ] {
            assert_eq!(
                at(seconds, nanos),
                format!("{seconds}s+{nanos}ns since 1970")
            );
        }
        let lasting = |seconds, nanos| Value::Duration(Duration { seconds, nanos }).to_string();
        assert_eq!(lasting(90, 0), "1m 30s");
        assert_eq!(lasting(-90, 0), "-1m 30s");
        assert_eq!(lasting(0, -5), "-5ns");
        for (seconds, nanos) in [(i64::MAX, i32::MAX), (i64::MIN, i32::MIN)] {
            assert!(!lasting(seconds, nanos).is_empty());
        }
    }

    fn bag() -> Bag {
        Bag::from([
            (
                "source.uid".into(),
                Value::String("kubernetes://productpage-v1.shop".into()),
            ),
            ("request.path".into(), Value::String("/reviews/1".into())),
            ("request.size".into(), Value::Int64(512)),
            ("response.code".into(), Value::Int64(200)),
            (
                "request.time".into(),
                Value::Timestamp(Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
            ),
            (
                "response.duration".into(),
                Value::Duration(Duration {
                    seconds: 0,
                    nanos: 1_500_000,
                }),
            ),
            ("connection.mtls".into(), Value::Bool(true)),
            ("custom.ratio".into(), Value::Double(0.25)),
            ("custom.bytes".into(), Value::Bytes(vec![0, 1, 2])),
            (
                "request.headers".into(),
                Value::StringMap(BTreeMap::from([
                    (":method".into(), "GET".into()),
                    ("x-user".into(), "jason".into()),
                ])),
            ),
        ])
    }

    #[test]
    fn compress_then_decode_round_trips_every_type() {
        let mut compressor = Compressor::default();
        let compressed = compressor.compress(&bag());
        let words = compressor.into_words();
        // Known names go by their global index, the others as message words.
        assert!(compressed.strings.keys().any(|k| *k >= 0));
        assert!(words.contains(&"custom.ratio".to_string()));
        assert!(!words.contains(&"request.path".to_string()));
        assert_eq!(decode(&compressed, &words, 0).unwrap(), bag());
    }

    #[test]
    fn indices_that_name_no_word_are_reported() {
        let mut attributes = CompressedAttributes::default();
        attributes.int64s.insert(-3, 1);
        let error = decode(&attributes, &["a".into()], 0).unwrap_err();
        assert!(error.0.contains("attribute name index -3"), "{error}");

        let mut attributes = CompressedAttributes::default();
        attributes.strings.insert(0, 500);
        let error = decode(&attributes, &[], 0).unwrap_err();
        assert!(error.0.contains("string value index 500"), "{error}");

        // A client that knows fewer global words than Mixer: indices past
        // its count are not words to it.
        let mut attributes = CompressedAttributes::default();
        attributes.int64s.insert(150, 1);
        assert!(decode(&attributes, &[], 100).is_err());
        assert!(
            decode(&attributes, &[], 300)
                .unwrap_err()
                .0
                .contains("global_word_count 300")
        );
    }

    #[test]
    fn delta_reports_build_on_the_entry_before() {
        let mut compressor = Compressor::default();
        let first = compressor.compress(&bag());
        let change = Bag::from([("response.code".into(), Value::Int64(503))]);
        let second = compressor.compress(&change);
        let request = ReportRequest {
            attributes: vec![first.clone(), second.clone()],
            default_words: compressor.into_words(),
            global_word_count: GLOBAL_WORDS.len() as u32,
            repeated_attributes_semantics: RepeatedAttributesSemantics::DeltaEncoding as i32,
        };
        let bags = decode_report(&request).unwrap();
        let mut expected = bag();
        expected.insert("response.code".into(), Value::Int64(503));
        assert_eq!(bags, [bag(), expected]);

        let independent = ReportRequest {
            repeated_attributes_semantics: RepeatedAttributesSemantics::IndependentEncoding as i32,
            ..request
        };
        assert_eq!(decode_report(&independent).unwrap(), [bag(), change]);
    }
}
