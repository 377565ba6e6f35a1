//! Service discovery: where objects come from, and what they tell about services and pods.
//!
//! Sources: a folder of Kubernetes-shaped YAML/JSON in local mode ([`folder`]), the API
//! server's watches in Kubernetes mode ([`kubernetes`]); both hand typed objects to the store.
//! From `Service`, `EndpointSlice` and `Pod` objects the [`Index`] keeps the engine's registry
//! and the lookups the proxy makes ([`Discovered`]: which VIP:port is which service, which pod
//! IP is which workload), one object at a time.

pub mod folder;
mod index;
pub mod kubernetes;
mod lookups;
pub mod membership;

pub use index::{Index, Name, DEFAULT_SERVICE_ACCOUNT};
pub use kubernetes::SourceChange;
pub use lookups::{Discovered, Protocol, ServiceTarget, Workload};
