//! The node agent of the mesh.
//!
//! Data flows one way: the kernel redirect (`redirect`) hands connections to the proxy
//! (`proxy`), which asks the engine (`engine`) for a decision per request and carries it out.
//! `config` turns raw Istio/Kubernetes objects into the validated model the engine reads.

pub mod config;
pub mod engine;
