//! A source pod's upstream pool: one HTTP/1.1 or HTTP/2 pool per destination cluster and
//! endpoint (as Envoy keeps a pool per cluster and host), all dialling from the pod's
//! namespace. The limits are the cluster's, counted by the engine across every pod and
//! snapshot; the connections are the pod's.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use foldhash::HashMap;

use hyper::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    body::ProxyBody,
    dial::Dialer,
    error::{Progress, SendError},
    http1::Http1Pool,
    http2::Http2Pool,
    response::ResponseBody,
};
use crate::engine::{ClusterId, ClusterPool};

/// Mirrored copies a pod may have in flight. Copies never wait for a connection, but a slow
/// shadow could still hold many; past this bound new copies are dropped (and counted).
const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// The upstream protocol: what the client spoke (HTTP/1.x goes upstream as HTTP/1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// With prior knowledge (h2c), as gRPC uses it.
    Http2,
}

/// Whether a request may wait for a connection, as pending requests do up to
/// `http1MaxPendingRequests`; a mirrored copy may not (it is dropped instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    Allowed,
    Refused,
}

/// A source pod's HTTP connections to its upstreams.
pub struct UpstreamPool {
    dialer: Dialer,
    hosts: Mutex<Hosts>,
    mirrors: Arc<Semaphore>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct HostKey {
    /// [`ClusterPool::key`].
    cluster: usize,
    endpoint: SocketAddr,
    protocol: Protocol,
}

struct Host {
    /// Keeps `HostKey::cluster` from being reused while this pool is in the map.
    _cluster: ClusterId,
    pool: HostPool,
}

#[derive(Clone)]
enum HostPool {
    Http1(Arc<Http1Pool>),
    Http2(Arc<Http2Pool>),
}

impl HostPool {
    /// No request holds it and it has no connection: nothing would be lost by forgetting it.
    fn is_unused(&self) -> bool {
        match self {
            HostPool::Http1(pool) => Arc::strong_count(pool) == 1 && pool.is_empty(),
            HostPool::Http2(pool) => Arc::strong_count(pool) == 1 && pool.is_empty(),
        }
    }
}

#[derive(Default)]
struct Hosts {
    pools: HashMap<HostKey, Host>,
    /// The size at which unused pools are swept out next (endpoints come and go).
    sweep_at: usize,
}

impl UpstreamPool {
    pub fn new(dialer: Dialer) -> Self {
        UpstreamPool {
            dialer,
            hosts: Mutex::default(),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
        }
    }

    /// Sends `request` to `endpoint` of `cluster`, on a pooled connection of `protocol` (see
    /// the module docs of `http1` and `http2`). `progress` says how far it got, for a caller
    /// whose deadline cuts it short.
    pub async fn send(
        &self,
        cluster: ClusterPool<'_>,
        endpoint: SocketAddr,
        protocol: Protocol,
        request: Request<ProxyBody>,
        waiting: Waiting,
        progress: &mut Progress,
    ) -> Result<Response<ResponseBody>, SendError> {
        let may_wait = waiting == Waiting::Allowed;
        // The body wrapped in one `map` as the response comes back (unpacked into its parts
        // and packed again, the response was moved more often).
        match self.host(cluster, endpoint, protocol) {
            HostPool::Http1(pool) => {
                let (response, lease) = pool.send(cluster, request, may_wait, progress).await?;
                Ok(response.map(|body| ResponseBody::new(body, lease)))
            }
            HostPool::Http2(pool) => {
                let (response, lease) = pool.send(cluster, request, may_wait, progress).await?;
                Ok(response.map(|body| ResponseBody::new(body, lease)))
            }
        }
    }

    /// A place among this pod's mirrored copies in flight, or `None` when it has too many.
    pub fn mirror_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.mirrors).try_acquire_owned().ok()
    }

    fn host(&self, cluster: ClusterPool<'_>, endpoint: SocketAddr, protocol: Protocol) -> HostPool {
        let key = HostKey {
            cluster: cluster.key(),
            endpoint,
            protocol,
        };
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = hosts.pools.get(&key) {
            return host.pool.clone();
        }
        if hosts.pools.len() >= hosts.sweep_at {
            hosts.pools.retain(|_, host| !host.pool.is_unused());
            hosts.sweep_at = (hosts.pools.len() * 2).max(64);
        }
        let dialer = self.dialer.clone();
        let pool = match protocol {
            Protocol::Http1 => HostPool::Http1(Arc::new(Http1Pool::new(endpoint, dialer))),
            Protocol::Http2 => HostPool::Http2(Arc::new(Http2Pool::new(endpoint, dialer))),
        };
        let host = Host {
            _cluster: cluster.id(),
            pool: pool.clone(),
        };
        hosts.pools.insert(key, host);
        pool
    }
}
