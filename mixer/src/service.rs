//! The `istio.mixer.v1.Mixer` gRPC service: Check answers with the decision
//! of the current config and the quotas granted, Report runs the config's
//! telemetry over each bag. Both roles serve both methods, as Istio's do;
//! what runs is in the config.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_api::pb::{
    google::rpc,
    istio::mixer::v1::{
        CheckRequest, CheckResponse, ReferencedAttributes, ReportRequest, ReportResponse,
        check_response::{PreconditionResult, QuotaResult},
        mixer_server::{Mixer, MixerServer},
        referenced_attributes::{AttributeMatch, Condition},
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use mixer_client::attributes::{self, Compressor};

use crate::{
    check,
    config::Config,
    expr::Referenced,
    quota::{self, QuotaStore},
    telemetry::{self, Outputs},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    /// `ok`, or the google.rpc code's number a denial carries.
    result: String,
}

#[derive(Clone)]
pub struct MixerService {
    config: watch::Receiver<Arc<Config>>,
    quotas: Arc<QuotaStore>,
    outputs: Arc<Outputs>,
    checks: Family<CheckLabels, Counter>,
    reports: Counter,
}

impl MixerService {
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        outputs: Arc<Outputs>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let service = Self {
            config,
            quotas: Arc::default(),
            outputs,
            checks: Family::default(),
            reports: Counter::default(),
        };
        registry.register(
            "checks",
            "Check requests answered, by result",
            service.checks.clone(),
        );
        registry.register(
            "report_entries",
            "Attribute bags received in Report requests",
            service.reports.clone(),
        );
        service
    }

    pub fn into_server(self) -> MixerServer<Self> {
        MixerServer::new(self)
    }
}

fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// What a decision read, as the client's cache key: names by word index
/// (global ones only below the request's `global_word_count`), map keys
/// with their map.
fn referenced(read: &Referenced, global_word_count: u32) -> ReferencedAttributes {
    let mut words = Compressor::for_reader(global_word_count);
    let mut matches = Vec::new();
    let mut add = |name: &str, key: Option<&str>, condition: Condition| {
        matches.push(AttributeMatch {
            name: words.index(name),
            condition: condition as i32,
            regex: String::new(),
            map_key: key.map_or(0, |k| words.index(k)),
        });
    };
    for name in &read.present {
        add(name, None, Condition::Exact);
    }
    for name in &read.absent {
        add(name, None, Condition::Absence);
    }
    for (map, key) in &read.present_keys {
        add(map, Some(key), Condition::Exact);
    }
    for (map, key) in &read.absent_keys {
        add(map, Some(key), Condition::Absence);
    }
    ReferencedAttributes {
        words: words.into_words(),
        attribute_matches: matches,
    }
}

#[tonic::async_trait]
impl Mixer for MixerService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let span = component::trace::span(
            "mixer",
            "mixer check",
            component::trace::of_metadata(request.metadata()).as_ref(),
            None,
            Vec::new(),
        );
        let request = request.into_inner();
        let global_word_count = request.global_word_count;
        let compressed = request.attributes.unwrap_or_default();
        let bag = attributes::decode(&compressed, &compressed.words, global_word_count)
            .map_err(|e| Status::invalid_argument(format!("attributes: {e}")))?;
        let config = self.config.borrow().clone();
        let decision = check::check(&config, &bag);
        let (code, message) = decision.denied.clone().unwrap_or((0, String::new()));
        {
            use opentelemetry::trace::TraceContextExt;
            span.span()
                .set_attribute(opentelemetry::KeyValue::new("mixer.code", i64::from(code)));
        }
        self.checks
            .get_or_create(&CheckLabels {
                result: if code == 0 {
                    "ok".into()
                } else {
                    code.to_string()
                },
            })
            .inc();
        let now = Instant::now();
        let quotas = request
            .quotas
            .into_iter()
            .map(|(name, params)| {
                let ask = quota::Ask {
                    quota: &name,
                    amount: params.amount,
                    best_effort: params.best_effort,
                    deduplication_id: &request.deduplication_id,
                };
                let grant = quota::allocate(&config, &bag, &ask, &self.quotas, now);
                let result = QuotaResult {
                    valid_duration: Some(duration(grant.valid_duration)),
                    granted_amount: grant.granted,
                    referenced_attributes: Some(referenced(&grant.referenced, global_word_count)),
                };
                (name, result)
            })
            .collect();
        component::trace::end(&span, (code != 0).then(|| message.clone()));
        Ok(Response::new(CheckResponse {
            precondition: Some(PreconditionResult {
                status: Some(rpc::Status {
                    code,
                    message,
                    details: Vec::new(),
                }),
                valid_duration: Some(duration(decision.valid_duration)),
                valid_use_count: decision.valid_use_count,
                referenced_attributes: Some(referenced(&decision.referenced, global_word_count)),
                route_directive: None,
            }),
            quotas,
        }))
    }

    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let bags = attributes::decode_report(&request.into_inner())
            .map_err(|e| Status::invalid_argument(format!("attributes: {e}")))?;
        self.reports.inc_by(bags.len() as u64);
        let config = self.config.borrow().clone();
        for bag in &bags {
            telemetry::report(&config, bag, &self.outputs);
        }
        Ok(Response::new(ReportResponse {}))
    }
}
