//! Checks of an MCP sink, playing a source: one that dials the sink's
//! `ResourceSink`, or one the sink dials (`ResourceSource`), which also
//! checks that the sink asks before it has the source's headers and that
//! it survives a source refusing a collection.

use tonic::Status;

use mesh_api::{
    kinds,
    pb::istio::mcp::v1alpha1::{Metadata, RequestResources, Resource, Resources},
    wkt,
};

use super::{
    Report,
    probe::{SourceListener, SourceProbe, Timing, short},
};

fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
    Resource {
        metadata: Some(Metadata {
            name: name.into(),
            version: version.into(),
            ..Default::default()
        }),
        body: Some(wkt::Any {
            type_url: type_url.into(),
            value: value.into(),
        }),
    }
}

/// Sends `message` and expects the answer for its nonce: `Ok(None)` for an
/// ACK, `Ok(Some(reason))` for a NACK.
async fn exchange(p: &mut SourceProbe, message: Resources) -> Result<Option<String>, String> {
    let nonce = message.nonce.clone();
    p.send(message).await?;
    let answer = p.recv().await?;
    if answer.response_nonce != nonce {
        return Err(format!(
            "answer echoes nonce {:?}, want {nonce:?}",
            answer.response_nonce
        ));
    }
    Ok(answer.error_detail.map(|e| e.message))
}

fn expect_ack(outcome: Result<Option<String>, String>) -> Result<String, String> {
    match outcome? {
        None => Ok(String::new()),
        Some(reason) => Err(format!("NACKed: {reason}")),
    }
}

fn expect_nack(outcome: Result<Option<String>, String>) -> Result<String, String> {
    match outcome? {
        Some(reason) => Ok(format!("reason: {reason:?}")),
        None => Err("ACKed a body it cannot have decoded".into()),
    }
}

/// Checks a sink that serves `ResourceSink` at `address`.
pub async fn check_dialing(address: &str, timing: Timing) -> anyhow::Result<Report> {
    let mut report = Report::default();
    match SourceProbe::to_sink(address, timing).await {
        Ok(mut p) => {
            check_stream(&mut p, timing, &mut report).await;
        }
        Err(e) => report.record(
            "1",
            "the sink opens with a request per collection, no nonce",
            Err(e),
        ),
    }
    // Rule 8, the dialling direction: Istio 1.1's Galley (`--sinkAddress`)
    // opens with a trigger and drops a stream whose first answer is not
    // its NACK with UNIMPLEMENTED.
    let answered = async {
        let mut p = SourceProbe::to_sink(address, timing).await?;
        let trigger = Resources {
            nonce: "conformance-trigger".into(),
            ..Default::default()
        };
        p.send(trigger).await?;
        let first = p.recv().await?;
        match first.error_detail {
            Some(e) if e.code == tonic::Code::Unimplemented as i32 && first.response_nonce == "conformance-trigger" => {
                Ok(format!("reason: {:?}", e.message))
            }
            Some(e) => Err(format!(
                "first answer NACKs nonce {:?} with code {}, want the trigger's with UNIMPLEMENTED (12)",
                first.response_nonce, e.code
            )),
            None => Err(format!(
                "first message is not the trigger's NACK: a request for {:?}",
                first.collection
            )),
        }
    }
    .await;
    report.record(
        "8",
        "a sink answers Istio 1.1's dial-out trigger first, UNIMPLEMENTED",
        answered,
    );
    Ok(report)
}

/// Checks a sink that dials the `ResourceSource` this serves on `address`.
pub async fn check_listening(address: &str, timing: Timing) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut listener = SourceListener::bind(address, timing)
        .await
        .map_err(anyhow::Error::msg)?;
    let accepted = listener.accept().await;
    report.record(
        "1",
        "the sink asks before it has the source's response headers",
        accepted
            .as_ref()
            .map(|_| String::new())
            .map_err(Clone::clone),
    );
    let Ok(mut p) = accepted else {
        return Ok(report);
    };
    let Some(opening) = check_stream(&mut p, timing, &mut report).await else {
        return Ok(report);
    };
    // Rule 8: refuse a collection, as Istio 1.1's Galley does.
    let Some(refused) = opening.refusable else {
        report.skip(
            "8",
            "a sink survives a source refusing a collection",
            "the sink asks for no collection besides the one checked",
        );
        return Ok(report);
    };
    let survived = async {
        p.end_with(Status::invalid_argument(format!(
            "unsupported collection {refused:?}"
        )))
        .await?;
        let mut next = listener.accept().await?;
        let asked = opening_requests(&mut next, timing).await?;
        if asked.iter().any(|r| r.collection == refused) {
            return Err(format!("the next stream asks for {refused} again"));
        }
        if !asked.iter().any(|r| r.collection == opening.checked) {
            return Err(format!(
                "the next stream no longer asks for {}",
                opening.checked
            ));
        }
        let update = Resources {
            collection: opening.checked.clone(),
            nonce: "conformance-after-refusal".into(),
            ..Default::default()
        };
        expect_ack(exchange(&mut next, update).await)?;
        Ok(format!(
            "{} collection(s) asked again, {refused} left out",
            asked.len()
        ))
    }
    .await;
    report.record(
        "8",
        "a sink survives a source refusing a collection",
        survived,
    );
    Ok(report)
}

/// What a stream's opening told: the collection the body checks used, and
/// another one that a source could refuse.
struct Opening {
    checked: String,
    refusable: Option<String>,
}

/// The opening requests of a stream: the first, and any that follow
/// within the quiet period.
async fn opening_requests(
    p: &mut SourceProbe,
    timing: Timing,
) -> Result<Vec<RequestResources>, String> {
    let mut opening = vec![p.recv().await?];
    while let Ok(Ok(r)) = tokio::time::timeout(timing.quiet, p.recv()).await {
        opening.push(r);
    }
    Ok(opening)
}

/// The checks every sink gets on one stream; `None` when they could not
/// go as far as the body checks.
async fn check_stream(p: &mut SourceProbe, timing: Timing, report: &mut Report) -> Option<Opening> {
    // Rule 1: one opening request per collection, nonce empty.
    let opening = opening_requests(p, timing).await;
    let opened = opening.as_ref().map_err(Clone::clone).and_then(|opening| {
        match opening.iter().find(|r| !r.response_nonce.is_empty()) {
            Some(bad) => Err(format!("opening request carries a nonce: {}", short(bad))),
            None => Ok(format!("{} collection(s)", opening.len())),
        }
    });
    report.record(
        "1",
        "the sink opens with a request per collection, no nonce",
        opened,
    );
    let opening = opening.ok()?;
    let Some(kind) = opening
        .iter()
        .find_map(|r| kinds::by_collection(&r.collection))
    else {
        println!("no requested collection has a body type this tool knows; body checks skipped");
        return None;
    };
    let incremental = opening
        .iter()
        .any(|r| r.collection == kind.collection && r.incremental);
    let collection = kind.collection.to_string();
    let type_url = kind.body.type_url();
    let valid = kind
        .body
        .decode(&[])
        .expect("the empty message decodes")
        .encode_to_vec();
    let full = |nonce: &str, resources: Vec<Resource>| Resources {
        collection: collection.clone(),
        nonce: nonce.into(),
        system_version_info: nonce.into(),
        resources,
        ..Default::default()
    };

    let ok = exchange(
        p,
        full(
            "conformance-1",
            vec![resource("conformance/a", "1", type_url, valid.clone())],
        ),
    )
    .await;
    report.record(
        "3",
        "a valid update is ACKed, echoing its nonce",
        expect_ack(ok),
    );

    let garbage = vec![0x0a, 0xff, 0xff];
    let bad = exchange(
        p,
        full(
            "conformance-2",
            vec![resource("conformance/a", "2", type_url, garbage)],
        ),
    )
    .await;
    report.record(
        "3",
        "an undecodable body is NACKed, echoing its nonce",
        expect_nack(bad),
    );

    let wrong = exchange(
        p,
        full(
            "conformance-3",
            vec![resource(
                "conformance/a",
                "3",
                "type.googleapis.com/mcp.conformance.NotThisType",
                valid.clone(),
            )],
        ),
    )
    .await;
    report.record(
        "3",
        "a body of the wrong type is NACKed",
        expect_nack(wrong),
    );

    if incremental {
        let mut add = full(
            "conformance-4",
            vec![resource("conformance/b", "1", type_url, valid.clone())],
        );
        add.incremental = true;
        let added = exchange(p, add).await;
        let mut remove = full("conformance-5", vec![]);
        remove.incremental = true;
        remove.removed_resources = vec!["conformance/b".into()];
        let removed = async {
            expect_ack(added)?;
            expect_ack(exchange(p, remove).await)
        }
        .await;
        report.record("5", "incremental additions and removals are ACKed", removed);
    }

    let after = exchange(
        p,
        full(
            "conformance-6",
            vec![resource("conformance/a", "6", type_url, valid)],
        ),
    )
    .await;
    report.record(
        "3",
        "after NACKs the stream goes on and ACKs again",
        expect_ack(after),
    );
    Some(Opening {
        refusable: opening
            .iter()
            .map(|r| &r.collection)
            .find(|c| **c != collection)
            .cloned(),
        checked: collection,
    })
}
