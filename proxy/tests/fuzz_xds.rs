//! xDS responses fuzzed: what Pilot generates for Bookinfo's proxies (a
//! sidecar of each workload and the ingress gateway), with bytes flipped,
//! cut, added or truncated, decodes and compiles to config or to a
//! problem, never a panic. Unmutated, every resource compiles: the proxy
//! takes all that Pilot sends.

use std::{
    collections::BTreeSet,
    sync::{Arc, OnceLock},
};

use envoy_types::pb::{
    envoy::config::{
        cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
        listener::v3::Listener, route::v3::RouteConfiguration,
    },
    google::protobuf::{Any, Struct, Value, value::Kind},
};
use mcp::SinkSnapshot;
use mesh_api::{mesh::defaults, object::ConfigObject};
use pilot::{
    model::Model,
    xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE, ResourceGenerator, generate::ModelGenerator},
};
use proptest::prelude::*;
use prost::Message;
use proxy::config;
use testkit::fuzz;

/// A proxy's node as its agent announces it: id and labels.
fn node(id: &str, labels: &[(&str, &str)]) -> Node {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| (k.to_string(), string(v)))
            .collect(),
    };
    Node {
        id: id.into(),
        metadata: Some(Struct {
            fields: [(
                "LABELS".to_string(),
                Value {
                    kind: Some(Kind::StructValue(labels)),
                },
            )]
            .into(),
        }),
        ..Default::default()
    }
}

/// Every resource Pilot generates for Bookinfo's proxies, as the `Any`
/// it sends, by type.
fn seeds() -> &'static Vec<Any> {
    static SEEDS: OnceLock<Vec<Any>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut objects = Vec::new();
        for dir in ["bookinfo", "multicluster"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                objects
                    .extend(ConfigObject::parse_yaml(&text, &path.display().to_string()).unwrap());
            }
        }
        let model = Model::from_snapshot(&SinkSnapshot::from_objects(objects), &defaults());
        let generator = ModelGenerator::new(Arc::new(model));
        let mut nodes: Vec<Node> = [
            ("productpage", "v1"),
            ("details", "v1"),
            ("reviews", "v2"),
            ("ratings", "v1"),
        ]
        .iter()
        .map(|(app, version)| {
            node(
                &format!("sidecar~127.0.0.1~{app}-{version}.bookinfo~bookinfo.svc.cluster.local"),
                &[("app", app), ("version", version)],
            )
        })
        .collect();
        nodes.push(node(
            "router~127.0.0.1~ingressgateway.istio-system~istio-system.svc.cluster.local",
            &[("istio", "ingressgateway")],
        ));
        let all = Arc::new(BTreeSet::new());
        let mut seeds = Vec::new();
        for node in &nodes {
            let client = generator.client(node).unwrap();
            for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
                let generated = generator.generate(&client, type_url, &all).merged();
                seeds.extend(
                    generated
                        .resources()
                        .iter()
                        .map(|r| Any::decode(r.any.clone()).unwrap()),
                );
            }
        }
        seeds
    })
}

/// Decodes `value` as a resource of `type_url` and compiles it as the
/// proxy's xDS client does. `Ok(false)`: it did not decode.
fn compile(type_url: &str, value: &[u8]) -> Result<bool, config::Problem> {
    fn decoded<M: Message + Default>(value: &[u8]) -> Option<M> {
        M::decode(value).ok()
    }
    match type_url {
        CLUSTER => decoded::<Cluster>(value).map(|c| config::Cluster::compile(&c).map(drop)),
        LISTENER => decoded::<Listener>(value).map(|l| config::Listener::compile(&l).map(drop)),
        ENDPOINT => decoded::<ClusterLoadAssignment>(value)
            .map(|a| config::cluster::eds_endpoints(&a).map(drop)),
        ROUTE => {
            decoded::<RouteConfiguration>(value).map(|r| config::RouteTable::compile(&r).map(drop))
        }
        other => panic!("Pilot generated a type the proxy does not ask for: {other}"),
    }
    .transpose()
    .map(|decoded| decoded.is_some())
}

#[test]
fn every_resource_pilot_generates_for_bookinfo_compiles() {
    let seeds = seeds();
    for type_url in [CLUSTER, ENDPOINT, LISTENER, ROUTE] {
        assert!(
            seeds.iter().any(|s| s.type_url == type_url),
            "no {type_url} generated"
        );
    }
    for seed in seeds {
        assert_eq!(compile(&seed.type_url, &seed.value), Ok(true), "{seed:?}");
    }
}

proptest! {
    #[test]
    fn any_mutant_of_what_pilot_sends_compiles_or_is_refused(
        seed in any::<prop::sample::Index>(),
        edits in fuzz::edits(),
    ) {
        let seeds = seeds();
        let seed = &seeds[seed.index(seeds.len())];
        let _ = compile(&seed.type_url, &fuzz::mutated(&seed.value, &edits));
    }

    #[test]
    fn any_bytes_as_any_type_compile_or_are_refused(
        type_url in prop::sample::select(vec![CLUSTER, ENDPOINT, LISTENER, ROUTE]),
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let _ = compile(type_url, &bytes);
    }
}
