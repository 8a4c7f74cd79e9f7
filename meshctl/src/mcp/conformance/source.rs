//! Checks of an MCP source, playing a sink over `ResourceSource`.

use std::{collections::BTreeMap, path::Path};

use mesh_api::{
    object::ConfigObject,
    pb::{
        google::rpc,
        istio::mcp::v1alpha1::{RequestResources, Resources},
    },
};
use tonic::Code;

use super::{
    Report,
    probe::{SinkProbe, Timing, short},
};

const PROBE_FILE: &str = "zz-mcp-conformance.yaml";
const PROBE_NAME: &str = "mcp-conformance-probe";

/// The probe object: a copy of a real one under another name, so that it
/// passes whatever validation the source applies to the real one.
struct ProbeFile {
    path: std::path::PathBuf,
    object: ConfigObject,
    revision: u32,
}

impl ProbeFile {
    fn new(dir: &Path, template: &ConfigObject) -> Self {
        let mut object = template.clone();
        object.name = PROBE_NAME.into();
        Self {
            path: dir.join(PROBE_FILE),
            object,
            revision: 0,
        }
    }

    fn mcp_name(&self) -> String {
        self.object.mcp_name()
    }

    /// Writes the next revision (a label change) to the directory.
    fn write_next(&mut self) -> Result<(), String> {
        self.revision += 1;
        self.object
            .labels
            .insert("mcp-conformance-revision".into(), self.revision.to_string());
        let yaml = serde_saphyr::to_string(&self.object.to_json()).map_err(|e| e.to_string())?;
        // Write then rename, so the source never reads a half-written file.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, yaml)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn remove(&self) -> Result<(), String> {
        std::fs::remove_file(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn request(collection: &str, incremental: bool) -> RequestResources {
    RequestResources {
        collection: collection.into(),
        incremental,
        ..Default::default()
    }
}

fn answer(r: &Resources, nonce: &str, error: Option<&str>, incremental: bool) -> RequestResources {
    RequestResources {
        collection: r.collection.clone(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| rpc::Status {
            code: Code::InvalidArgument as i32,
            message: m.into(),
            details: vec![],
        }),
        incremental,
        ..Default::default()
    }
}

fn versions(r: &Resources) -> BTreeMap<String, String> {
    r.resources
        .iter()
        .filter_map(|r| r.metadata.as_ref())
        .map(|m| (m.name.clone(), m.version.clone()))
        .collect()
}

fn sorted_names(r: &Resources) -> Vec<String> {
    let mut names: Vec<_> = versions(r).into_keys().collect();
    names.sort();
    names
}

/// Receives the next response for `collection`, checking it is one.
async fn next_for(p: &mut SinkProbe, collection: &str) -> Result<Resources, String> {
    let r = p.recv().await?;
    if r.collection != collection {
        return Err(format!(
            "response for {:?}, expected {collection:?}",
            r.collection
        ));
    }
    if r.nonce.is_empty() {
        return Err("response without a nonce".into());
    }
    Ok(r)
}

/// How the checks cause changes at the source.
pub enum Changes<'a> {
    /// By editing a file in the directory the source serves.
    Dir(&'a Path),
    /// Not at all: the source's config cannot be edited by this tool, and
    /// the checks of `collection` that need a change are skipped.
    None(&'a str),
}

const NO_CHANGES: &str = "needs a change at the source: give --dir";

/// The directory's objects, all valid, and the probe file to edit there.
fn served_by(dir: &Path) -> anyhow::Result<(Vec<String>, ProbeFile)> {
    let mut problems = Vec::new();
    let mut objects = Vec::new();
    for path in galley::dir::config_files_in(&[dir.to_path_buf()], &mut problems) {
        match galley::dir::read_objects(&path) {
            Ok(found) => objects.extend(found),
            Err(e) => problems.push(e),
        }
    }
    let refs: Vec<&ConfigObject> = objects.iter().collect();
    for (i, found) in galley::validation::validate_all(&refs) {
        problems.extend(
            found
                .iter()
                .filter(|p| p.is_error())
                .map(|p| format!("{}: {p}", refs[i].location)),
        );
    }
    anyhow::ensure!(
        problems.is_empty(),
        "--dir must hold valid config: {}",
        problems.join("; ")
    );
    let Some(template) = objects.first().cloned() else {
        anyhow::bail!(
            "--dir {} holds no config objects to check against",
            dir.display()
        );
    };
    let mut want: Vec<String> = objects
        .iter()
        .filter(|o| o.kind.collection == template.kind.collection)
        .map(ConfigObject::mcp_name)
        .collect();
    want.sort();
    want.dedup();
    Ok((want, ProbeFile::new(dir, &template)))
}

pub async fn check(address: &str, changes: Changes<'_>, timing: Timing) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let (collection, want, mut file) = match changes {
        Changes::Dir(dir) => {
            let (want, file) = served_by(dir)?;
            let collection = file.object.kind.collection;
            println!(
                "checking collection {collection} ({} resources in {})",
                want.len(),
                dir.display()
            );
            (collection.to_string(), Some(want), Some(file))
        }
        Changes::None(collection) => {
            println!(
                "checking collection {collection} (no --dir: the source's config is not edited)"
            );
            (collection.to_string(), None, None)
        }
    };
    let collection = collection.as_str();

    // Rules 1, 2 and 7: the first response is the full state.
    let opened = SinkProbe::to_source(address, timing).await;
    let first = match opened {
        Ok(mut p) => match p.send(request(collection, false)).await {
            Ok(()) => next_for(&mut p, collection).await.map(|r| (p, r)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    report.record(
        "1,2",
        "a request sent before the headers gets a response with a nonce",
        first
            .as_ref()
            .map(|(_, r)| format!("nonce {:?}", r.nonce))
            .map_err(Clone::clone),
    );
    let Ok((mut p, first)) = first else {
        return Ok(report);
    };
    let names = sorted_names(&first);
    let named = match &want {
        Some(want) if names == *want => Ok(format!("{} resources", want.len())),
        Some(want) => Err(format!("got {names:?}, want {want:?}")),
        None => {
            let namespaced =
                mesh_api::kinds::by_collection(collection).is_none_or(|k| k.namespaced);
            match names.iter().find(|n| n.contains('/') != namespaced) {
                Some(bad) => Err(format!("{bad:?} is not named as rule 7 says")),
                None => Ok(format!("{} resources", names.len())),
            }
        }
    };
    let check = if want.is_some() {
        "resources are the directory's, named namespace/name"
    } else {
        "resources are named namespace/name"
    };
    report.record("7", check, named);
    let Some(file) = file.as_mut() else {
        let quiet = async {
            p.send(answer(&first, &first.nonce, None, false)).await?;
            p.quiet()
                .await
                .map_err(|e| format!("after an ACK with no change: {e}"))
        }
        .await;
        report.record(
            "3",
            "after an ACK nothing is sent while nothing changes",
            quiet.map(|()| String::new()),
        );
        for (rule, check) in [
            ("3", "after an ACK a change is sent"),
            ("2", "nonces are unique on the stream"),
            ("3", "after a NACK nothing is sent until a change"),
            ("4", "a stale nonce is ignored"),
        ] {
            report.skip(rule, check, NO_CHANGES);
        }
        check_incremental(address, collection, &first, None, timing, &mut report).await;
        check_unknown_collection(address, timing, &mut report).await;
        return Ok(report);
    };
    let probe_name = file.mcp_name();

    // Rule 3, ACK: quiet until a change, then the change.
    let second = async {
        p.send(answer(&first, &first.nonce, None, false)).await?;
        p.quiet()
            .await
            .map_err(|e| format!("after an ACK with no change: {e}"))?;
        file.write_next()?;
        let r = next_for(&mut p, collection).await?;
        if !versions(&r).contains_key(&probe_name) {
            return Err(format!(
                "response after the change lacks {probe_name}: {}",
                short(&r)
            ));
        }
        Ok(r)
    }
    .await;
    report.record(
        "3",
        "after an ACK nothing is sent until a change",
        second.as_ref().map(|_| String::new()).map_err(Clone::clone),
    );
    let Ok(second) = second else {
        return Ok(report);
    };
    report.record(
        "2",
        "nonces are unique on the stream",
        if second.nonce != first.nonce {
            Ok(String::new())
        } else {
            Err(format!("nonce {:?} reused", second.nonce))
        },
    );

    // Rule 3, NACK: quiet until a change, then the change.
    let third = async {
        p.send(answer(
            &second,
            &second.nonce,
            Some("conformance: refusing on purpose"),
            false,
        ))
        .await?;
        p.quiet()
            .await
            .map_err(|e| format!("after a NACK with no change: {e}"))?;
        file.write_next()?;
        let r = next_for(&mut p, collection).await?;
        if versions(&r).get(&probe_name) == versions(&second).get(&probe_name) {
            return Err("response after the change carries the NACKed version".into());
        }
        Ok(r)
    }
    .await;
    report.record(
        "3",
        "after a NACK nothing is sent until a change",
        third.as_ref().map(|_| String::new()).map_err(Clone::clone),
    );
    let Ok(third) = third else { return Ok(report) };

    // Rule 4: a stale nonce is no answer; the real one still is.
    let fourth = async {
        p.send(answer(&third, &first.nonce, None, false)).await?;
        file.write_next()?;
        p.quiet()
            .await
            .map_err(|e| format!("a stale nonce was taken as an answer: {e}"))?;
        p.send(answer(&third, &third.nonce, None, false)).await?;
        let r = next_for(&mut p, collection).await?;
        if versions(&r).get(&probe_name) == versions(&third).get(&probe_name) {
            return Err("response after the answer lacks the change".into());
        }
        p.send(answer(&r, &r.nonce, None, false)).await?;
        Ok(r)
    }
    .await;
    report.record(
        "4",
        "a stale nonce is ignored",
        fourth.as_ref().map(|_| String::new()).map_err(Clone::clone),
    );
    let Ok(fourth) = fourth else {
        return Ok(report);
    };

    check_incremental(
        address,
        collection,
        &fourth,
        Some((file, &probe_name)),
        timing,
        &mut report,
    )
    .await;
    check_unknown_collection(address, timing, &mut report).await;
    Ok(report)
}

/// Rule 5: a new stream declaring what it holds (`held`'s resources, less
/// one, plus one the source does not have) gets only the difference; with
/// a probe file to remove, the removal must reach that stream too.
async fn check_incremental(
    address: &str,
    collection: &str,
    held: &Resources,
    removable: Option<(&mut ProbeFile, &str)>,
    timing: Timing,
    report: &mut Report,
) {
    let mut declared = versions(held);
    let dropped = sorted_names(held).into_iter().next();
    if let Some(name) = &dropped {
        declared.remove(name);
    }
    declared.insert("mcp-conformance/not-held-by-source".into(), "1".into());
    let incremental = async {
        let mut p = SinkProbe::to_source(address, timing).await?;
        p.send(RequestResources {
            initial_resource_versions: declared,
            ..request(collection, true)
        })
        .await?;
        let r = next_for(&mut p, collection).await?;
        let note = if r.incremental {
            let changed = sorted_names(&r);
            let want_changed: Vec<String> = dropped.iter().cloned().collect();
            if changed != want_changed {
                return Err(format!("diff carries {changed:?}, want {want_changed:?}"));
            }
            if !r
                .removed_resources
                .iter()
                .any(|n| n == "mcp-conformance/not-held-by-source")
            {
                return Err(format!(
                    "removed_resources {:?} lacks the name the source does not hold",
                    r.removed_resources
                ));
            }
            "diff against initial_resource_versions".to_string()
        } else {
            "full state: the source does not serve this collection incrementally".to_string()
        };
        Ok((p, r, note))
    }
    .await;
    report.record(
        "5",
        "a new stream with initial versions gets the difference",
        incremental
            .as_ref()
            .map(|(_, _, n)| n.clone())
            .map_err(Clone::clone),
    );
    let Some((file, probe_name)) = removable else {
        report.skip("5", "a removal reaches the sink", NO_CHANGES);
        return;
    };
    if let Ok((mut p, r, _)) = incremental {
        let removal = async {
            p.send(answer(&r, &r.nonce, None, true)).await?;
            file.remove()?;
            let r = next_for(&mut p, collection).await?;
            if r.incremental {
                if !r.removed_resources.iter().any(|n| n == probe_name) || !r.resources.is_empty() {
                    return Err(format!("incremental removal should carry only removed_resources [{probe_name}]: {}", short(&r)));
                }
                Ok("incremental".to_string())
            } else if versions(&r).contains_key(probe_name) {
                Err("full state after the removal still holds the removed resource".into())
            } else {
                Ok("full state".to_string())
            }
        }
        .await;
        report.record("5", "a removal reaches the sink", removal);
    }
}

/// Rule 6: an unknown collection ends the stream with InvalidArgument.
async fn check_unknown_collection(address: &str, timing: Timing, report: &mut Report) {
    let unknown = async {
        let mut p = SinkProbe::to_source(address, timing).await?;
        p.send(request("mcp-conformance/no-such-collection", false))
            .await?;
        match p.end().await? {
            Err(status) if status.code() == Code::InvalidArgument => {
                Ok(format!("{:?}", status.message()))
            }
            Err(status) => Err(format!(
                "ended with {:?}, want InvalidArgument",
                status.code()
            )),
            Ok(()) => Err("ended without a status, want InvalidArgument".into()),
        }
    }
    .await;
    report.record(
        "6",
        "an unknown collection ends the stream with InvalidArgument",
        unknown,
    );
}
