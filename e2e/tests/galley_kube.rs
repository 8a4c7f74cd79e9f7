//! The `galley` binary in Kubernetes mode, pointed by a kubeconfig at a fake
//! API server (`testkit::fake_kube`; there is no Kubernetes API server on these
//! machines): it becomes ready once every watch has listed and serves the
//! cluster's config, synthetic ServiceEntries and raw core collections over
//! MCP to a real sink.

use serde_json::Value;
use testkit::{fake_kube::FakeApi, *};

#[tokio::test]
async fn galley_serves_a_cluster_over_mcp() {
    let (_api, addr) = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, FakeApi::kubeconfig(addr)).unwrap();
    let (mcp, admin) = (free_addr(), free_addr());
    let mut galley = Proc::start(
        "galley",
        &[
            "--kube",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--mcp-addr",
            &mcp.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ],
    );
    galley.ready(admin).await;

    let collections = "istio/networking/v1alpha3/virtualservices,istio/networking/v1alpha3/synthetic/serviceentries,k8s/core/v1/pods";
    let mut watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--server",
            &mcp.to_string(),
            "--once",
            "--output",
            "json",
            "--collections",
            collections,
        ],
    );
    let mut updates = Vec::new();
    while updates.len() < 3 {
        let line = watch.stdout_until("\"collection\"").await.pop().unwrap();
        updates.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    assert!(watch.exit().await.success());
    let find = |collection: &str| {
        updates
            .iter()
            .find(|u| u["collection"] == collection)
            .unwrap()
            .clone()
    };
    let routes = find("istio/networking/v1alpha3/virtualservices");
    assert_eq!(
        routes["resources"].as_array().unwrap().len(),
        1,
        "the invalid VirtualService is held back: {routes}"
    );
    let services = find("istio/networking/v1alpha3/synthetic/serviceentries");
    assert_eq!(
        services["resources"][0]["body"]["hosts"][0],
        "reviews.bookinfo.svc.cluster.local"
    );
    let pods = find("k8s/core/v1/pods");
    assert_eq!(pods["resources"][0]["name"], "bookinfo/reviews-v1-7c9b");
    assert_eq!(
        pods["resources"][0]["body"]["spec"]["serviceAccountName"],
        "bookinfo-reviews"
    );

    let (_, page) = get(admin, "/debug/config").await.unwrap();
    assert!(
        page.contains("spec.http[0].route: destination weights add up to 60, not 100"),
        "{page}"
    );
    assert!(galley.terminate().await.success());
}
