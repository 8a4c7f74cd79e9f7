//! The Kubernetes source against a fake API server (`testkit::fake_kube`: there
//! is no Kubernetes API server on these machines), over real HTTP.

use std::{sync::Arc, time::Duration};

use component::CancellationToken;
use galley::kube_source;
use mcp::Store;
use mesh_api::kinds;
use serde_json::{Value, json};
use testkit::fake_kube::FakeApi;

const VIRTUAL_SERVICES: &str = "/apis/networking.istio.io/v1alpha3/virtualservices";
const SERVICES: &str = "/api/v1/services";

async fn start() -> (FakeApi, Arc<Store>, CancellationToken) {
    let (api, addr) = FakeApi::start().await;
    let url = format!("http://{addr}");

    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let store = galley::new_store();
    let stop = CancellationToken::new();
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    tokio::spawn(kube_source::start(
        client,
        store.clone(),
        "cluster.local".into(),
        stop.clone(),
        |_| {},
        move || {
            let _ = synced_tx.send(());
        },
    ));
    tokio::time::timeout(Duration::from_secs(20), synced)
        .await
        .expect("the source syncs")
        .unwrap();
    (api, store, stop)
}

fn names(store: &Store, collection: &str) -> Vec<String> {
    store
        .full(collection)
        .unwrap()
        .1
        .iter()
        .map(|r| r.metadata.as_ref().unwrap().name.clone())
        .collect()
}

/// Polls `check` until it holds (the source applies events asynchronously).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn virtual_service(name: &str, resource_version: &str, subset: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "bookinfo", "resourceVersion": resource_version},
        "spec": {"hosts": [name], "http": [{"route": [{"destination": {"host": name, "subset": subset}}]}]}})
}

#[tokio::test]
async fn lists_become_collections_and_synthetic_service_entries() {
    let (_api, store, stop) = start().await;
    assert_eq!(
        names(&store, kinds::VIRTUAL_SERVICES),
        ["bookinfo/reviews"],
        "the invalid one is not served"
    );
    assert_eq!(
        names(&store, kinds::DESTINATION_RULES),
        ["bookinfo/reviews"]
    );
    assert_eq!(
        names(&store, kinds::SYNTHETIC_SERVICE_ENTRIES),
        ["bookinfo/reviews"]
    );
    let (_, entries) = store.full(kinds::SYNTHETIC_SERVICE_ENTRIES).unwrap();
    let body = kinds::BodyType::ServiceEntry
        .decode(&entries[0].body.as_ref().unwrap().value)
        .unwrap()
        .to_json();
    assert_eq!(body["hosts"], json!(["reviews.bookinfo.svc.cluster.local"]));
    assert_eq!(body["endpoints"][0]["labels"]["version"], "v1");
    assert_eq!(body["endpoints"][0]["locality"], "us-east1/us-east1-b");
    assert_eq!(
        body["subjectAltNames"],
        json!(["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"])
    );
    stop.cancel();
}

#[tokio::test]
async fn watch_events_are_followed_across_a_watch_restart() {
    let (api, store, stop) = start().await;
    eventually("the watch to open", || {
        api.open_watches(VIRTUAL_SERVICES) > 0
    })
    .await;

    api.push(
        VIRTUAL_SERVICES,
        json!({"type": "ADDED", "object": virtual_service("ratings", "2100", "v1")}),
    );
    eventually("the added object", || {
        names(&store, kinds::VIRTUAL_SERVICES).contains(&"bookinfo/ratings".to_string())
    })
    .await;
    let version = |store: &Store| {
        store
            .full(kinds::VIRTUAL_SERVICES)
            .unwrap()
            .1
            .iter()
            .find(|r| r.metadata.as_ref().unwrap().name == "bookinfo/ratings")
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .version
            .clone()
    };
    let first = version(&store);

    api.push(
        VIRTUAL_SERVICES,
        json!({"type": "MODIFIED", "object": virtual_service("ratings", "2101", "v2")}),
    );
    eventually("the modified object", || version(&store) != first).await;

    // The API server ends the watch; the watcher watches again from where
    // it was and sees what happens next.
    api.close_watches(VIRTUAL_SERVICES);
    eventually("the watch to reopen", || {
        api.open_watches(VIRTUAL_SERVICES) > 0
    })
    .await;
    api.push(
        VIRTUAL_SERVICES,
        json!({"type": "DELETED", "object": virtual_service("reviews", "2102", "v1")}),
    );
    eventually("the deletion", || {
        names(&store, kinds::VIRTUAL_SERVICES) == ["bookinfo/ratings"]
    })
    .await;

    // Platform changes reach the synthetic service entries.
    eventually("the services watch", || api.open_watches(SERVICES) > 0).await;
    api.push(
        SERVICES,
        json!({"type": "ADDED", "object": {"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "ratings", "namespace": "bookinfo", "resourceVersion": "2200"},
        "spec": {"clusterIP": "10.96.14.9", "ports": [{"name": "http", "port": 9080}]}}}),
    );
    eventually("the new service", || {
        names(&store, kinds::SYNTHETIC_SERVICE_ENTRIES).len() == 2
    })
    .await;
    stop.cancel();
}
