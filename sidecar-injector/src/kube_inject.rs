//! `meshctl kube-inject`: the webhook's injection applied offline to the
//! pods, and the pod templates of workloads, in a file of Kubernetes
//! YAML, as `istioctl kube-inject` does. Other documents pass unchanged.

use serde_json::Value;

use crate::inject::{Injector, Outcome};

/// Where each workload kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Pod" => "",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => return None,
    })
}

/// Injects every pod and pod template in `text` (YAML, one or more
/// documents); the result as YAML documents.
pub fn kube_inject(text: &str, injector: &Injector) -> anyhow::Result<String> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| anyhow::anyhow!("not YAML: {e}"))?;
    let mut out = Vec::new();
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_document(&mut doc, injector).map_err(|e| {
            let kind = doc["kind"].as_str().unwrap_or("?");
            let name = doc["metadata"]["name"].as_str().unwrap_or("?");
            anyhow::anyhow!("document {} ({kind} {name}): {e:#}", i + 1)
        })?;
        out.push(serde_saphyr::to_string(&doc)?);
    }
    Ok(out.join("---\n"))
}

fn inject_document(doc: &mut Value, injector: &Injector) -> anyhow::Result<()> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    if kind == "List" {
        for item in doc["items"].as_array_mut().into_iter().flatten() {
            inject_document(item, injector)?;
        }
        return Ok(());
    }
    let Some(path) = template_path(kind) else {
        return Ok(());
    };
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let pod = doc
        .pointer_mut(path)
        .ok_or_else(|| anyhow::anyhow!("no pod template at {path}"))?;
    if let Outcome::Injected(patch) = injector.inject(pod, &namespace)? {
        json_patch::patch(pod, &patch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT};

    #[test]
    fn workloads_get_the_sidecar_and_other_documents_pass() {
        let injector = Injector::new(Config::parse(DEFAULT, "default").unwrap()).unwrap();
        let text = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews}
spec:
  template:
    metadata: {labels: {app: reviews}}
    spec: {containers: [{name: app, image: reviews}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  jobTemplate:
    spec:
      template:
        spec: {containers: [{name: job, image: job}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080}]}
";
        let out = kube_inject(text, &injector).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(docs.len(), 3);
        let names = |pod: &Value| -> Vec<String> {
            pod["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names(&docs[0]["spec"]["template"]), ["app", "istio-proxy"]);
        let job = &docs[1]["spec"]["jobTemplate"]["spec"]["template"];
        assert_eq!(names(job), ["job", "istio-proxy"]);
        assert_eq!(docs[2]["spec"]["ports"][0]["port"], 9080);
    }

    #[test]
    fn a_workload_without_a_template_is_named_in_the_error() {
        let injector = Injector::new(Config::parse(DEFAULT, "default").unwrap()).unwrap();
        let e = kube_inject(
            "kind: Deployment\nmetadata: {name: web}\nspec: {}\n",
            &injector,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Deployment web): no pod template at /spec/template"
        );
    }
}
