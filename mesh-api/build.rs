//! Compiles every `.proto` under `proto/` with protox (no system `protoc`),
//! then generates prost messages, tonic services and pbjson serde impls.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "google/rpc/status.proto",
    "istio/mcp/v1alpha1/mcp.proto",
    "istio/networking/v1alpha3/virtual_service.proto",
    "istio/networking/v1alpha3/destination_rule.proto",
    "istio/networking/v1alpha3/gateway.proto",
    "istio/networking/v1alpha3/service_entry.proto",
    "istio/networking/v1alpha3/sidecar.proto",
    "istio/networking/v1alpha3/envoy_filter.proto",
    "istio/authentication/v1alpha1/policy.proto",
    "istio/rbac/v1alpha1/rbac.proto",
    "istio/policy/v1beta1/cfg.proto",
    "istio/policy/v1beta1/value_type.proto",
    "istio/mesh/v1alpha1/config.proto",
    "istio/mixer/v1/attributes.proto",
    "istio/mixer/v1/mixer.proto",
    "istio/mixer/v1/config/client/client.proto",
    "istio/v1/auth/ca.proto",
    "k8s/io/apimachinery/pkg/apis/meta/v1/meta.proto",
    "k8s/io/apimachinery/pkg/util/intstr/intstr.proto",
    "k8s/io/api/core/v1/core.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile(PROTOS, ["proto"])?;
    let descriptor_path = out.join("descriptors.bin");
    std::fs::write(&descriptor_path, fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .compile_well_known_types(true)
        // Ordered maps encode deterministically, so equal config gets equal
        // bytes and equal content-hash versions in every process.
        .btree_map(".")
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        .btree_map(["."])
        .build(&[".istio", ".google.rpc", ".k8s"])?;
    Ok(())
}
