//! Who is talking to whom. `names`: a service of the mesh and a workload as telemetry labels
//! them. The rest is cryptographic identity, the ground of the mutual TLS between agents:
//! `spiffe` (a workload's SPIFFE ID), `ca` (the local CA and the trust bundle),
//! `certificates` (obtaining and renewing workload certificates from an issuer), `signer`
//! (Kubernetes mode's CSR signer, `ca serve`), `csr` (the agent's issuer in Kubernetes mode) and
//! `tls` (rustls configs whose verifiers check a peer's chain and SPIFFE ID).

pub mod ca;
pub mod certificates;
pub mod csr;
mod names;
pub mod signer;
pub mod spiffe;
pub mod tls;

pub use names::*;
