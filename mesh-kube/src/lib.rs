//! Kubernetes plumbing for the components that run in kube mode (Galley,
//! Citadel, the injector), kept out of `component` so that the others do
//! not link `kube`.

mod client;
pub mod webhook_ca;

pub use client::client;
