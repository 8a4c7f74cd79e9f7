//! Field numbers and types pinned by hand-assembled protobuf bytes: each
//! message decodes to the expected values and encodes back byte for byte.

use mesh_api::pb::{
    google::rpc::Status,
    istio::{
        mcp::v1alpha1::{Metadata, RequestResources, Resource, Resources, SinkNode},
        mixer::v1::{CompressedAttributes, StringMap},
        v1::auth::IstioCertificateRequest,
    },
};
use prost::Message;

/// A length-delimited field: tag byte, length, payload.
fn ld(tag: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn resources_field_numbers() {
    let metadata = cat(&[ld(0x0a, b"ns/a"), ld(0x1a, b"7")]); // name = 1, version = 3
    let body = cat(&[ld(0x0a, b"type.googleapis.com/x"), ld(0x12, &[0x08, 0x01])]);
    let resource = cat(&[ld(0x0a, &metadata), ld(0x12, &body)]);
    let bytes = cat(&[
        ld(0x0a, b"42"),      // system_version_info = 1
        ld(0x12, b"istio/c"), // collection = 2
        ld(0x1a, &resource),  // resources = 3
        ld(0x22, b"ns/gone"), // removed_resources = 4
        ld(0x2a, b"n1"),      // nonce = 5
        vec![0x30, 0x01],     // incremental = 6
    ]);
    let decoded = Resources::decode(&bytes[..]).unwrap();
    assert_eq!(
        decoded,
        Resources {
            system_version_info: "42".into(),
            collection: "istio/c".into(),
            resources: vec![Resource {
                metadata: Some(Metadata {
                    name: "ns/a".into(),
                    version: "7".into(),
                    ..Default::default()
                }),
                body: Some(pbjson_types::Any {
                    type_url: "type.googleapis.com/x".into(),
                    value: vec![0x08, 0x01].into(),
                }),
            }],
            removed_resources: vec!["ns/gone".into()],
            nonce: "n1".into(),
            incremental: true,
        }
    );
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn request_resources_field_numbers() {
    let annotation = cat(&[ld(0x0a, b"k"), ld(0x12, b"v")]);
    let node = cat(&[ld(0x0a, b"sink-1"), ld(0x12, &annotation)]);
    let version = cat(&[ld(0x0a, b"ns/a"), ld(0x12, b"7")]);
    let status = cat(&[vec![0x08, 0x03], ld(0x12, b"bad body")]);
    let bytes = cat(&[
        ld(0x0a, &node),      // sink_node = 1
        ld(0x12, b"istio/c"), // collection = 2
        ld(0x1a, &version),   // initial_resource_versions = 3
        ld(0x22, b"n1"),      // response_nonce = 4
        ld(0x2a, &status),    // error_detail = 5
        vec![0x30, 0x01],     // incremental = 6
    ]);
    let decoded = RequestResources::decode(&bytes[..]).unwrap();
    assert_eq!(
        decoded,
        RequestResources {
            sink_node: Some(SinkNode {
                id: "sink-1".into(),
                annotations: [("k".into(), "v".into())].into(),
            }),
            collection: "istio/c".into(),
            initial_resource_versions: [("ns/a".into(), "7".into())].into(),
            response_nonce: "n1".into(),
            error_detail: Some(Status {
                code: 3,
                message: "bad body".into(),
                details: vec![]
            }),
            incremental: true,
        }
    );
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn mixer_attributes_use_zigzag_keys() {
    // strings = 2: map<sint32, sint32>, {-1: 3} zigzags to {1: 6}.
    // string_maps = 9: {-2: StringMap{entries = 1: {4: -5}}}.
    let inner_entry = ld(0x0a, &[0x08, 0x08, 0x10, 0x09]);
    let bytes = cat(&[
        ld(0x0a, b"x-user"),
        ld(0x12, &[0x08, 0x01, 0x10, 0x06]),
        ld(0x4a, &cat(&[vec![0x08, 0x03], ld(0x12, &inner_entry)])),
    ]);
    let decoded = CompressedAttributes::decode(&bytes[..]).unwrap();
    assert_eq!(decoded.words, ["x-user"]);
    assert_eq!(decoded.strings, [(-1, 3)].into());
    assert_eq!(
        decoded.string_maps,
        [(
            -2,
            StringMap {
                entries: [(4, -5)].into()
            }
        )]
        .into()
    );
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn ca_request_field_numbers() {
    let bytes = cat(&[ld(0x0a, b"PEM"), ld(0x12, b"id"), vec![0x18, 0x90, 0x1c]]); // 3600
    let decoded = IstioCertificateRequest::decode(&bytes[..]).unwrap();
    assert_eq!(decoded.csr, "PEM");
    assert_eq!(decoded.subject_id, "id");
    assert_eq!(decoded.validity_duration, 3600);
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn truncated_messages_are_errors_not_panics() {
    let full = Resources {
        collection: "istio/c".into(),
        nonce: "n".into(),
        ..Default::default()
    }
    .encode_to_vec();
    // Cutting between the two fields leaves a valid message; any cut inside
    // a field must be reported.
    let boundary = 2 + "istio/c".len();
    for cut in (1..full.len()).filter(|&c| c != boundary) {
        assert!(Resources::decode(&full[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn kubernetes_core_field_numbers() {
    use mesh_api::pb::k8s::io::{
        api::core::v1::ServiceSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    // ServiceSpec: ports = 1 (ServicePort: name = 1, port = 3), clusterIP = 3, type = 4.
    let port = cat(&[ld(0x0a, b"http"), vec![0x18, 0x50]]);
    let bytes = cat(&[
        ld(0x0a, &port),
        ld(0x1a, b"10.0.0.1"),
        ld(0x22, b"ClusterIP"),
    ]);
    let spec = ServiceSpec::decode(&bytes[..]).unwrap();
    assert_eq!(
        (spec.ports[0].name.as_str(), spec.ports[0].port),
        ("http", 80)
    );
    assert_eq!(
        (spec.cluster_ip.as_str(), spec.r#type.as_str()),
        ("10.0.0.1", "ClusterIP")
    );
    assert_eq!(spec.encode_to_vec(), bytes);

    // ObjectMeta: name = 1, namespace = 3, labels = 11.
    let bytes = cat(&[
        ld(0x0a, b"web"),
        ld(0x1a, b"shop"),
        ld(0x5a, &cat(&[ld(0x0a, b"app"), ld(0x12, b"web")])),
    ]);
    let meta = ObjectMeta::decode(&bytes[..]).unwrap();
    assert_eq!(
        (
            meta.name.as_str(),
            meta.namespace.as_str(),
            meta.labels["app"].as_str()
        ),
        ("web", "shop", "web")
    );
    assert_eq!(meta.encode_to_vec(), bytes);
}
