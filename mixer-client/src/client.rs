//! The client side of Mixer, for proxies. Check answers are cached by
//! exactly the attributes (and map keys) Mixer said the decision read, for
//! as long and as many uses as it allowed, so most requests never leave the
//! proxy. Reports are batched and sent delta-encoded. When Mixer cannot be
//! reached, checks fail open or closed as configured.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use mesh_api::pb::istio::mixer::v1::{
    CheckRequest, CheckResponse, ReferencedAttributes, ReportRequest, check_request::QuotaParams,
    mixer_client::MixerClient, referenced_attributes::Condition,
    report_request::RepeatedAttributesSemantics,
};
use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

use crate::attributes::{Bag, Compressor, Value, dictionary::GLOBAL_WORDS};

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Let requests through when Mixer cannot answer.
    pub fail_open: bool,
    /// Reports are sent once this many are waiting.
    pub batch_size: usize,
    /// Quotas each check asks one of. A check that asks for quota is
    /// always sent: a cached answer cannot count.
    pub quotas: Vec<String>,
    /// Times a check that cannot reach Mixer is tried again, waiting 80 ms
    /// and doubling to 1 s (Istio's `NetworkFailPolicy`), before the
    /// fail-open or fail-closed answer: enough to ride out a restart.
    pub retries: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            fail_open: true,
            batch_size: 100,
            quotas: Vec::new(),
            retries: 0,
        }
    }
}

/// The first wait before a check is tried again, and the longest.
const RETRY_WAIT: (Duration, Duration) = (Duration::from_millis(80), Duration::from_secs(1));

/// A check's outcome for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// A google.rpc code and message.
    Deny {
        code: i32,
        message: String,
    },
}

/// google.rpc.Code UNAVAILABLE, for a fail-closed check Mixer did not answer.
const UNAVAILABLE: i32 = 14;
/// google.rpc.Code RESOURCE_EXHAUSTED, for a quota not granted.
const RESOURCE_EXHAUSTED: i32 = 8;

/// What a cached decision depended on: attribute, map key, and whether it
/// was present.
type Shape = Vec<(String, Option<String>, bool)>;

struct Entry {
    verdict: Verdict,
    expires: Instant,
    uses_left: i32,
}

/// Decisions by the values of what they read.
#[derive(Default)]
struct CheckCache {
    shapes: HashMap<Shape, HashMap<Vec<String>, Entry>>,
}

impl CheckCache {
    /// The values `bag` has for `shape`, if it agrees on presence.
    fn key(shape: &Shape, bag: &Bag) -> Option<Vec<String>> {
        let mut key = Vec::with_capacity(shape.len());
        for (name, map_key, present) in shape {
            let value = match (bag.get(name), map_key) {
                (Some(Value::StringMap(m)), Some(k)) => m.get(k).cloned(),
                (Some(_), Some(_)) | (None, _) => None,
                (Some(v), None) => Some(v.to_string()),
            };
            match (value, present) {
                (Some(v), true) => key.push(v),
                (None, false) => {}
                _ => return None,
            }
        }
        Some(key)
    }

    fn lookup(&mut self, bag: &Bag, now: Instant) -> Option<Verdict> {
        for (shape, entries) in &mut self.shapes {
            let Some(key) = Self::key(shape, bag) else {
                continue;
            };
            let Some(entry) = entries.get_mut(&key) else {
                continue;
            };
            if entry.expires <= now || entry.uses_left <= 0 {
                entries.remove(&key);
                continue;
            }
            entry.uses_left -= 1;
            return Some(entry.verdict.clone());
        }
        None
    }

    fn insert(&mut self, shape: Shape, bag: &Bag, entry: Entry) {
        if let Some(key) = Self::key(&shape, bag) {
            self.shapes.entry(shape).or_default().insert(key, entry);
        }
    }
}

/// The shape of a response's referenced attributes; `None` when it names a
/// word it does not carry (such an answer is not cached).
fn shape(referenced: &ReferencedAttributes) -> Option<Shape> {
    let word = |i: i32| -> Option<String> {
        if i >= 0 {
            GLOBAL_WORDS.get(i as usize).map(|w| w.to_string())
        } else {
            referenced.words.get((-(i as i64) - 1) as usize).cloned()
        }
    };
    let mut shape: Shape = referenced
        .attribute_matches
        .iter()
        .map(|m| {
            let key = if m.map_key != 0 {
                Some(word(m.map_key)?)
            } else {
                None
            };
            let present = m.condition == Condition::Exact as i32;
            Some((word(m.name)?, key, present))
        })
        .collect::<Option<_>>()?;
    shape.sort();
    Some(shape)
}

pub struct Client {
    grpc: MixerClient<Channel>,
    options: ClientOptions,
    cache: Mutex<CheckCache>,
    batch: Mutex<Vec<Bag>>,
}

/// Whether a call failed for want of Mixer: it could not be reached
/// (UNAVAILABLE), or its connection broke with the call in flight (a
/// Mixer killed mid-call: tonic says UNKNOWN, from the transport).
fn unreachable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || std::error::Error::source(status).is_some_and(|e| e.is::<tonic::transport::Error>())
}

impl Client {
    pub fn new(channel: Channel, options: ClientOptions) -> Self {
        Self {
            grpc: MixerClient::new(channel),
            options,
            cache: Mutex::default(),
            batch: Mutex::default(),
        }
    }

    /// Sends a check, trying again while Mixer cannot be reached. The
    /// request goes again as it was, deduplication id and all: a Mixer that
    /// granted its quota already grants the same again, not twice.
    async fn send_check(
        &self,
        request: CheckRequest,
        trace: Option<&str>,
    ) -> Result<CheckResponse, tonic::Status> {
        // The caller's trace context goes as W3C `traceparent` metadata:
        // Mixer's span of the Check joins the request's trace.
        let traceparent = trace.and_then(|t| t.parse::<MetadataValue<Ascii>>().ok());
        let call = |request: CheckRequest| {
            let mut call = tonic::Request::new(request);
            if let Some(t) = &traceparent {
                call.metadata_mut().insert("traceparent", t.clone());
            }
            call
        };
        let mut wait = RETRY_WAIT.0;
        for _ in 0..self.options.retries {
            match self.grpc.clone().check(call(request.clone())).await {
                Err(status) if unreachable(&status) => {
                    tracing::debug!(%status, ?wait, "mixer check failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_WAIT.1);
                }
                outcome => return outcome.map(tonic::Response::into_inner),
            }
        }
        self.grpc
            .clone()
            .check(call(request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Whether the request described by `bag` may proceed.
    pub async fn check(&self, bag: &Bag) -> Verdict {
        self.check_in(bag, None).await
    }

    /// [`Client::check`] for a request in the trace `traceparent` (W3C)
    /// names.
    pub async fn check_in(&self, bag: &Bag, traceparent: Option<&str>) -> Verdict {
        let now = Instant::now();
        let counts_quota = !self.options.quotas.is_empty();
        if !counts_quota && let Some(verdict) = self.lock_cache().lookup(bag, now) {
            return verdict;
        }
        let mut compressor = Compressor::default();
        let mut attributes = compressor.compress(bag);
        attributes.words = compressor.into_words();
        let request = CheckRequest {
            attributes: Some(attributes),
            global_word_count: GLOBAL_WORDS.len() as u32,
            deduplication_id: format!("{:016x}", fastrand::u64(..)),
            quotas: self
                .options
                .quotas
                .iter()
                .map(|name| {
                    let params = QuotaParams {
                        amount: 1,
                        best_effort: false,
                    };
                    (name.clone(), params)
                })
                .collect(),
        };
        let response = match self.send_check(request, traceparent).await {
            Ok(response) => response,
            Err(status) if self.options.fail_open => {
                tracing::debug!(%status, "mixer check failed; failing open");
                return Verdict::Allow;
            }
            Err(status) => {
                return Verdict::Deny {
                    code: UNAVAILABLE,
                    message: format!("mixer check failed: {}", status.message()),
                };
            }
        };
        let precondition = response.precondition.unwrap_or_default();
        let status = precondition.status.unwrap_or_default();
        let exhausted = self.options.quotas.iter().find(|name| {
            response
                .quotas
                .get(*name)
                .is_none_or(|q| q.granted_amount < 1)
        });
        let verdict = match (status.code, exhausted) {
            (0, None) => Verdict::Allow,
            (0, Some(name)) => {
                return Verdict::Deny {
                    code: RESOURCE_EXHAUSTED,
                    message: format!("Quota is exhausted for: {name}"),
                };
            }
            (code, _) => Verdict::Deny {
                code,
                message: status.message,
            },
        };
        let valid_for = precondition
            .valid_duration
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or_default();
        let shape = precondition.referenced_attributes.as_ref().and_then(shape);
        if let Some(shape) = shape
            && !valid_for.is_zero()
            && precondition.valid_use_count > 0
        {
            let entry = Entry {
                verdict: verdict.clone(),
                expires: now + valid_for,
                // This check was the first use.
                uses_left: precondition.valid_use_count - 1,
            };
            self.lock_cache().insert(shape, bag, entry);
        }
        verdict
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, CheckCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a report; the batch goes out once it is full.
    pub async fn report(&self, bag: Bag) -> Result<(), tonic::Status> {
        if self.queue(bag) {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Queues a report without sending anything; whether the batch is now
    /// full, and should be flushed.
    pub fn queue(&self, bag: Bag) -> bool {
        let mut batch = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        batch.push(bag);
        batch.len() >= self.options.batch_size
    }

    /// Sends every queued report, encoded by [`report_request`].
    pub async fn flush(&self) -> Result<(), tonic::Status> {
        let bags = std::mem::take(&mut *self.batch.lock().unwrap_or_else(|e| e.into_inner()));
        if bags.is_empty() {
            return Ok(());
        }
        self.grpc.clone().report(report_request(&bags)).await?;
        Ok(())
    }
}

/// A Report of `bags`, delta-encoded: each bag carries only what changed
/// from the one before (independently encoded when a bag lacks an
/// attribute the one before had, which a delta cannot say).
pub fn report_request(bags: &[Bag]) -> ReportRequest {
    let delta = bags
        .windows(2)
        .all(|pair| pair[0].keys().all(|k| pair[1].contains_key(k)));
    let mut compressor = Compressor::default();
    let mut previous: Option<&Bag> = None;
    let attributes = bags
        .iter()
        .map(|bag| {
            let compressed = match previous {
                Some(before) if delta => compressor.compress_some(
                    bag.iter()
                        .filter(|(k, v)| before.get(k.as_str()) != Some(*v)),
                ),
                _ => compressor.compress(bag),
            };
            previous = Some(bag);
            compressed
        })
        .collect();
    let semantics = if delta {
        RepeatedAttributesSemantics::DeltaEncoding
    } else {
        RepeatedAttributesSemantics::IndependentEncoding
    };
    ReportRequest {
        attributes,
        default_words: compressor.into_words(),
        global_word_count: GLOBAL_WORDS.len() as u32,
        repeated_attributes_semantics: semantics as i32,
    }
}
