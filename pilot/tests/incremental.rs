//! The incremental model and generation against a fresh build. Random
//! sequences of adds, changes and removals are applied to a snapshot as a
//! sink applies MCP updates (persistent maps, one object at a time); after
//! each step, the model that followed every step must equal the model
//! built from the last snapshot alone, and a generator that was published
//! each change (and generated between them, so that it rebuilds only what
//! changed) must give every proxy the same resources as a fresh one.
//!
//! A failure names the seed and the step; the sequence replays from them.

use std::{collections::BTreeSet, sync::Arc};

use envoy_types::pb::envoy::config::core::v3::Node;
use mcp::{Payload, SinkSnapshot};
use mesh_api::{
    kinds::{self, Body},
    mesh::defaults,
    object::ConfigObject,
    pb::istio::networking::v1alpha3::service_entry,
};
use pilot::{
    model::Model,
    xds::{
        CLUSTER, ENDPOINT, LISTENER, ROUTE, ResourceGenerator,
        generate::{Client, ModelGenerator},
    },
};

const NAMESPACES: [&str; 2] = ["ns-0", "ns-1"];
const ADDRESSES: [&str; 4] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"];

fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

/// A host from a small pool, so that objects collide: full names, short
/// names resolved in the object's namespace, and external hosts.
fn host(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..4) {
        0 => format!("svc-{}", rng.u8(..3)),
        1 => format!(
            "svc-{}.{}.svc.cluster.local",
            rng.u8(..3),
            pick(rng, &NAMESPACES)
        ),
        2 => format!("api-{}.example.com", rng.u8(..2)),
        _ => format!("svc-{}.ns-0.svc.cluster.local", rng.u8(..2)),
    }
}

fn endpoints(rng: &mut fastrand::Rng) -> String {
    let list: Vec<String> = (0..rng.usize(..3))
        .map(|_| {
            format!(
                "{{address: {}, labels: {{app: a, version: v{}}}}}",
                pick(rng, &ADDRESSES),
                rng.u8(1..3)
            )
        })
        .collect();
    format!("[{}]", list.join(", "))
}

/// A random object of a random kind, as YAML, with its collection's
/// objects drawn from a few names per namespace; and, for a ServiceEntry,
/// whether it goes to the synthetic collection instead, as Galley's made
/// from Kubernetes Services do.
fn object(rng: &mut fastrand::Rng) -> (String, bool) {
    let ns = pick(rng, &NAMESPACES);
    let name = format!("o-{}", rng.u8(..3));
    let meta = format!("metadata: {{name: {name}, namespace: {ns}}}");
    let yaml = match rng.u8(..8) {
        0 | 1 => {
            let resolution = if rng.u8(..4) == 0 { "DNS" } else { "STATIC" };
            let yaml = format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\n{meta}\nspec:\n  hosts: [{}]\n  resolution: {resolution}\n  ports: [{{number: {}, name: http, protocol: HTTP}}, {{number: 9090, name: tcp, protocol: TCP}}]\n  endpoints: {}\n",
                host(rng),
                [80, 8080][rng.usize(..2)],
                endpoints(rng),
            );
            return (yaml, rng.bool());
        }
        2 => {
            let host = if rng.u8(..4) == 0 {
                "'*.ns-0.svc.cluster.local'".to_string()
            } else {
                host(rng)
            };
            let lb = ["ROUND_ROBIN", "RANDOM"][rng.usize(..2)];
            format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\n{meta}\nspec:\n  host: {host}\n  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v{}, labels: {{version: v2}}}}\n",
                rng.u8(2..4)
            )
        }
        3 => {
            let host = host(rng);
            format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\n{meta}\nspec:\n  hosts: [{host}]\n  http:\n  - route: [{{destination: {{host: {host}, subset: v{}}}}}]\n    timeout: {}s\n",
                rng.u8(1..3),
                rng.u8(1..4)
            )
        }
        4 => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: Sidecar\n{meta}\nspec:\n  egress:\n  - hosts: ['./*', '{}/*']\n",
            pick(rng, &NAMESPACES)
        ),
        5 => format!(
            "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\n{meta}\nspec:\n  peers: [{{mtls: {{mode: {}}}}}]\n",
            ["STRICT", "PERMISSIVE"][rng.usize(..2)]
        ),
        6 => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\n{meta}\nspec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {}, name: http, protocol: HTTP}}\n    hosts: ['*']\n",
            [80, 8080][rng.usize(..2)]
        ),
        _ => format!(
            "apiVersion: rbac.istio.io/v1alpha1\nkind: ServiceRole\n{meta}\nspec:\n  rules: [{{services: ['*'], methods: [{}]}}]\n",
            ["GET", "POST"][rng.usize(..2)]
        ),
    };
    (yaml, false)
}

/// Puts `object` into `snapshot` (into `collection`, else its own) as a
/// sink applies one MCP resource.
fn put(snapshot: &mut SinkSnapshot, object: ConfigObject, collection: Option<&str>) {
    snapshot.put(collection.unwrap_or(object.kind.collection), object);
}

/// Gives a random ServiceEntry of `snapshot`, if it holds any, new
/// endpoints and nothing else: an endpoint-only change.
fn move_endpoints(snapshot: &mut SinkSnapshot, rng: &mut fastrand::Rng) {
    let entries: Vec<(String, String)> = [kinds::SERVICE_ENTRIES, kinds::SYNTHETIC_SERVICE_ENTRIES]
        .iter()
        .filter_map(|c| Some((c, snapshot.collections.get(*c)?)))
        .flat_map(|(c, h)| h.resources.keys().map(move |k| (c.to_string(), k.clone())))
        .collect();
    if entries.is_empty() {
        return;
    }
    let (collection, key) = &entries[rng.usize(..entries.len())];
    let held = snapshot.collections.get_mut(collection).unwrap();
    let mut resource = (**held.resources.get(key).unwrap()).clone();
    if let Payload::Decoded(Body::ServiceEntry(spec)) = &mut resource.payload {
        spec.endpoints = (0..rng.usize(..3))
            .map(|_| service_entry::Endpoint {
                address: pick(rng, &ADDRESSES).to_string(),
                labels: [("app", "a"), ("version", ["v1", "v2"][rng.usize(..2)])]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .collect();
    }
    held.resources.insert(key.clone(), Arc::new(resource));
}

/// Removes a random object of `snapshot`, if it holds any.
fn remove_one(snapshot: &mut SinkSnapshot, rng: &mut fastrand::Rng) {
    let held: Vec<(String, String)> = snapshot
        .collections
        .iter()
        .flat_map(|(c, h)| h.resources.keys().map(move |k| (c.clone(), k.clone())))
        .collect();
    if held.is_empty() {
        return;
    }
    let (collection, key) = &held[rng.usize(..held.len())];
    let collection = snapshot.collections.get_mut(collection).unwrap();
    collection.resources.remove(key);
}

mod support;

fn node(id: &str, labels: &[(&str, &str)]) -> Node {
    support::node(id, labels, &[])
}

fn nodes() -> Vec<Node> {
    vec![
        node(
            "sidecar~10.0.0.1~a-1.ns-0~ns-0.svc.cluster.local",
            &[("app", "a"), ("version", "v1")],
        ),
        node(
            "sidecar~10.0.0.2~a-2.ns-1~ns-1.svc.cluster.local",
            &[("app", "a"), ("version", "v2")],
        ),
        node(
            "router~10.0.0.9~gw.ns-0~ns-0.svc.cluster.local",
            &[("istio", "ingressgateway")],
        ),
    ]
}

/// Every proxy's resources of every type, by name and content hash; `all`
/// subscribes to all, one set throughout, as a stream's names are.
fn generated(
    generator: &ModelGenerator,
    clients: &[Client],
    all: &Arc<BTreeSet<String>>,
) -> Vec<Vec<(String, u64)>> {
    clients
        .iter()
        .flat_map(|p| {
            [CLUSTER, ENDPOINT, LISTENER, ROUTE].map(|t| {
                let g = generator.generate(p, t, all).merged();
                g.resources()
                    .iter()
                    .map(|r| (r.name.to_string(), r.hash))
                    .collect()
            })
        })
        .collect()
}

#[test]
fn incremental_updates_give_what_a_fresh_build_gives() {
    let mesh = defaults();
    let nodes = nodes();
    let clients = |generator: &ModelGenerator| -> Vec<Client> {
        nodes.iter().map(|n| generator.client(n).unwrap()).collect()
    };
    for seed in 0..40 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut snapshot = SinkSnapshot::default();
        let mut model = Model::from_snapshot(&snapshot, &mesh);
        let generator = ModelGenerator::new(Arc::new(model.clone()));
        // The same clients throughout, keeping what they were sent.
        let followers = clients(&generator);
        let all = Arc::new(BTreeSet::new());
        for step in 0..40 {
            let before = snapshot.clone();
            // Several objects at once now and then, as one debounced push.
            for _ in 0..rng.usize(1..3) {
                let op = rng.u8(..6);
                if op == 0 {
                    remove_one(&mut snapshot, &mut rng);
                } else if op == 1 {
                    move_endpoints(&mut snapshot, &mut rng);
                } else {
                    let (yaml, synthetic) = object(&mut rng);
                    let collection = synthetic.then_some(kinds::SYNTHETIC_SERVICE_ENTRIES);
                    for o in ConfigObject::parse_yaml(&yaml, "test.yaml").unwrap() {
                        put(&mut snapshot, o, collection);
                    }
                }
            }
            let change = model.update(&before, &snapshot, &mesh);
            let fresh = Model::from_snapshot(&snapshot, &mesh);
            assert!(
                model == fresh,
                "seed {seed} step {step}: the updated model differs from a fresh one"
            );
            generator.publish(Arc::new(model.clone()), &change);
            let rebuilt = ModelGenerator::new(Arc::new(fresh));
            assert_eq!(
                generated(&generator, &followers, &all),
                generated(&rebuilt, &clients(&rebuilt), &all),
                "seed {seed} step {step}: generation after {change:?}"
            );
        }
    }
}

#[test]
fn a_source_that_stops_serving_synthetic_entries_is_followed_from_the_raw_objects() {
    let mesh = defaults();
    let yaml = "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {name: a, namespace: ns-0}\nspec:\n  hosts: [a.ns-0.svc.cluster.local]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.0.0.1}]\n";
    let mut served = SinkSnapshot::default();
    for o in ConfigObject::parse_yaml(yaml, "test.yaml").unwrap() {
        put(&mut served, o, Some(kinds::SYNTHETIC_SERVICE_ENTRIES));
    }
    let mut model = Model::from_snapshot(&served, &mesh);
    assert!(model.services.contains_key("a.ns-0.svc.cluster.local"));
    // A source that refuses the collection: its entries are not current.
    let mut refused = served.clone();
    let held = refused
        .collections
        .get_mut(kinds::SYNTHETIC_SERVICE_ENTRIES)
        .unwrap();
    held.refused = Some("not served".into());
    let change = model.update(&served, &refused, &mesh);
    assert_eq!(model, Model::from_snapshot(&refused, &mesh));
    assert!(change.services.contains("a.ns-0.svc.cluster.local"));
}
