//! Who is talking to whom. `names`: a service of the mesh and a workload as telemetry labels
//! them. `spiffe`: a workload's cryptographic identity, its SPIFFE ID.

mod names;
pub mod spiffe;

pub use names::*;
