//! The node agent of the mesh.
//!
//! Data flows one way: the kernel redirect (`redirect`) hands connections to in-pod listeners
//! (`enrollment`), the proxy (`proxy`) asks the engine (`engine`) for a decision per request and
//! carries it out. `config` turns raw Istio/Kubernetes objects into the validated model the
//! engine reads; `admin` only reads snapshots. `handover` passes a running agent's listeners,
//! pods and kernel state to the agent that replaces it.

pub mod admin;
pub mod authorization;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod enrollment;
pub mod exposition;
pub mod handover;
pub mod hbone;
pub mod heap;
pub mod identity;
pub mod inbound;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod run;
pub mod socket_file;
pub mod state;
pub mod telemetry;
