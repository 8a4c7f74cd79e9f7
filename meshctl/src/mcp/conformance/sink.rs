//! Checks of an MCP sink, playing a source that dials its `ResourceSink`.

use mcp_proto::{
    kinds,
    pb::istio::mcp::v1alpha1::{Metadata, RequestResources, Resource, Resources},
    wkt,
};

use super::{
    Report,
    probe::{SourceProbe, Timing, short},
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

pub async fn check(address: &str, timing: Timing) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let mut p = match SourceProbe::to_sink(address, timing).await {
        Ok(p) => p,
        Err(e) => {
            report.record(
                "1",
                "the sink opens with a request per collection, no nonce",
                Err(e),
            );
            return Ok(report);
        }
    };

    // Rule 1: one opening request per collection, nonce empty.
    let mut opening: Vec<RequestResources> = Vec::new();
    let first = p.recv().await;
    let opened = match first {
        Ok(r) => {
            opening.push(r);
            while let Ok(Some(r)) = tokio::time::timeout(timing.quiet, p.recv())
                .await
                .map(Result::ok)
            {
                opening.push(r);
            }
            if let Some(bad) = opening.iter().find(|r| !r.response_nonce.is_empty()) {
                Err(format!("opening request carries a nonce: {}", short(bad)))
            } else {
                Ok(format!("{} collection(s)", opening.len()))
            }
        }
        Err(e) => Err(e),
    };
    report.record(
        "1",
        "the sink opens with a request per collection, no nonce",
        opened,
    );
    let Some(kind) = opening
        .iter()
        .find_map(|r| kinds::by_collection(&r.collection))
    else {
        if !opening.is_empty() {
            println!(
                "no requested collection has a body type this tool knows; body checks skipped"
            );
        }
        return Ok(report);
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
        &mut p,
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
        &mut p,
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
        &mut p,
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
        let added = exchange(&mut p, add).await;
        let mut remove = full("conformance-5", vec![]);
        remove.incremental = true;
        remove.removed_resources = vec!["conformance/b".into()];
        let removed = async {
            expect_ack(added)?;
            expect_ack(exchange(&mut p, remove).await)
        }
        .await;
        report.record("5", "incremental additions and removals are ACKed", removed);
    }

    let after = exchange(
        &mut p,
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
    Ok(report)
}
