//! Citadel, the mesh's CA: key and root handling, CSR signing over gRPC,
//! the Kubernetes secret controller and rotation. Not built yet (issue 5):
//! the binary serves only its admin port.
