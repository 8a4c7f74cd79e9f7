//! The sidecar injector: the mutating admission webhook and the injection
//! template, shared with `meshctl kube-inject`. Not built yet (issue 8):
//! the binary serves only its admin port.
