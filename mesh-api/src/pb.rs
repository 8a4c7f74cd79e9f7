//! Code generated at build time from `proto/`: one module per protobuf
//! package, each with prost messages, tonic services and pbjson serde impls.

macro_rules! include_package {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
        include!(concat!(env!("OUT_DIR"), "/", $package, ".serde.rs"));
    };
}

pub mod google {
    pub mod rpc {
        include_package!("google.rpc");
    }
}

pub mod istio {
    pub mod mcp {
        pub mod v1alpha1 {
            include_package!("istio.mcp.v1alpha1");
        }
    }
    pub mod networking {
        pub mod v1alpha3 {
            include_package!("istio.networking.v1alpha3");
        }
    }
    pub mod authentication {
        pub mod v1alpha1 {
            include_package!("istio.authentication.v1alpha1");
        }
    }
    pub mod rbac {
        pub mod v1alpha1 {
            include_package!("istio.rbac.v1alpha1");
        }
    }
    pub mod policy {
        pub mod v1beta1 {
            include_package!("istio.policy.v1beta1");
        }
    }
    pub mod mesh {
        pub mod v1alpha1 {
            include_package!("istio.mesh.v1alpha1");
        }
    }
    pub mod mixer {
        pub mod v1 {
            include_package!("istio.mixer.v1");
            pub mod config {
                pub mod client {
                    include_package!("istio.mixer.v1.config.client");
                }
            }
        }
    }
    pub mod v1 {
        pub mod auth {
            include_package!("istio.v1.auth");
        }
    }
}

pub mod k8s {
    pub mod io {
        pub mod api {
            pub mod core {
                pub mod v1 {
                    include_package!("k8s.io.api.core.v1");
                }
            }
        }
        pub mod apimachinery {
            pub mod pkg {
                pub mod apis {
                    pub mod meta {
                        pub mod v1 {
                            include_package!("k8s.io.apimachinery.pkg.apis.meta.v1");
                        }
                    }
                }
                pub mod util {
                    pub mod intstr {
                        include_package!("k8s.io.apimachinery.pkg.util.intstr");
                    }
                }
            }
        }
    }
}
