//! HTTP/1.1 to one endpoint of one cluster, for one source pod: keep-alive connections carry
//! one request at a time and are reused most recently used first.
//!
//! A request takes an idle connection; if none is free it is pending (Envoy counts it so even
//! while a connection opens for it) and either opens one — below `tcp.maxConnections`, or when
//! this pool has none at all (Envoy's guarantee) — or waits for the first connection given
//! back. Waiting requests are served in arrival order: a connection given back goes to the
//! first of them through the semaphore of idle connections, never to a newcomer.

use std::{
    mem,
    net::SocketAddr,
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use hyper::{body::Incoming, client::conn::http1, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    sync::{Notify, Semaphore},
    time::Instant,
};
use tracing::debug;

use super::{
    body::{BoxError, ProxyBody},
    connection::{Dial, Owner},
    dial::Dialer,
    error::{self, Progress, SendError},
    http1_connection::{self, Sender, Sleeps, Wake, Waking, SLEEP_AFTER},
    response_check,
};
use crate::engine::{ClusterPool, Permit, PoolLimits};

pub(super) struct Http1Pool {
    endpoint: SocketAddr,
    dialer: Dialer,
    state: Mutex<State>,
    /// One permit per idle connection. Requests that wait for one queue here in arrival order,
    /// and a connection given back goes to the first of them.
    idle_permits: Semaphore,
    /// A connection of this pool closed or failed to open: a waiting request may open one.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Most recently used last.
    idle: Vec<Idle>,
    /// Connections open or being opened.
    open: usize,
    next_id: u64,
    /// Dials that failed so far: the requests waiting when one fails fail with it, as Envoy
    /// fails its pending requests on a connect failure (each would otherwise wait its turn to
    /// time out on the same endpoint).
    failed_dials: u64,
}

struct Idle {
    id: u64,
    connection: IdleConnection,
    served: u32,
    since: Instant,
}

/// An idle connection, awake or asleep (`http1_connection`).
enum IdleConnection {
    Awake(Sender),
    Asleep(Wake),
}

/// A connection checked out for one request. [`Lease::finish`] gives it back; dropping it
/// instead means the exchange did not complete, and hyper closes the connection.
pub(super) struct Lease {
    pool: Arc<Http1Pool>,
    id: u64,
    sender: Sender,
    /// Requests sent on this connection, this one included.
    served: u32,
    /// `maxRequestsPerConnection` of the request that took it.
    max_served: Option<u32>,
}

impl Http1Pool {
    pub(super) fn new(endpoint: SocketAddr, dialer: Dialer) -> Self {
        Http1Pool {
            endpoint,
            dialer,
            state: Mutex::default(),
            idle_permits: Semaphore::new(0),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no connection is open or opening (the pool can be forgotten).
    pub(super) fn is_empty(&self) -> bool {
        self.lock().open == 0
    }

    /// Sends `request` on a connection of this pool (see the module docs); a request that may
    /// not wait fails with `Overflow` where it would have to.
    pub(super) async fn send(
        self: &Arc<Self>,
        cluster: ClusterPool<'_>,
        mut request: Request<ProxyBody>,
        may_wait: bool,
        progress: &mut Progress,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut lease, reused) = self.checkout(cluster, may_wait, progress).await?;
            *progress = Progress::Sent;
            match lease.sender.try_send_request(request).await {
                Ok(response) => {
                    // A refused response drops the lease unfinished: hyper closes the
                    // connection, whose next bytes cannot be trusted.
                    response_check::check(&response)?;
                    return Ok((response, lease));
                }
                Err(failed) => {
                    request = error::unsent(failed, reused)?;
                    *progress = Progress::Waiting;
                }
            }
        }
    }

    /// A connection for one request, and whether it was reused.
    async fn checkout(
        self: &Arc<Self>,
        cluster: ClusterPool<'_>,
        may_wait: bool,
        progress: &mut Progress,
    ) -> Result<(Lease, bool), SendError> {
        let limits = cluster.limits();
        if let Some(lease) = self.take_idle(limits).await {
            return Ok((lease, true));
        }
        let _pending = match may_wait {
            true => Some(cluster.try_pending().map_err(|_| SendError::Overflow)?),
            false => None,
        };
        let failed_before = self.lock().failed_dials;
        let mut given_back = pin!(self.idle_permits.acquire());
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if let Some(slot) = self.connection_slot(cluster) {
                let lease = self.dial(slot, limits, progress).await?;
                return Ok((lease, false));
            }
            if !may_wait {
                return Err(SendError::Overflow);
            }
            if self.lock().failed_dials != failed_before {
                return Err(SendError::ConnectFailure);
            }
            tokio::select! {
                permit = &mut given_back => {
                    // The semaphore is never closed.
                    if let Ok(permit) = permit {
                        permit.forget();
                    }
                    if let Some(lease) = self.pop_idle(limits).await {
                        return Ok((lease, true));
                    }
                    given_back.set(self.idle_permits.acquire());
                }
                () = &mut changed => {}
            }
        }
    }

    /// An idle connection, if one is free and no request is waiting for it already.
    async fn take_idle(self: &Arc<Self>, limits: &PoolLimits) -> Option<Lease> {
        loop {
            self.idle_permits.try_acquire().ok()?.forget();
            if let Some(lease) = self.pop_idle(limits).await {
                return Some(lease);
            }
        }
    }

    /// The most recently used idle connection (its permit taken already); `None` when it was
    /// closed meanwhile.
    async fn pop_idle(self: &Arc<Self>, limits: &PoolLimits) -> Option<Lease> {
        let idle = self.lock().idle.pop()?;
        let sender = match idle.connection {
            IdleConnection::Awake(mut sender) => {
                // A connection given back at the end of a response body may still be
                // finishing it.
                sender.ready().await.ok()?;
                sender
            }
            IdleConnection::Asleep(wake) => http1_connection::wake(wake).await?,
        };
        Some(Lease {
            pool: Arc::clone(self),
            id: idle.id,
            sender,
            served: idle.served + 1,
            max_served: limits.max_requests_per_connection,
        })
    }

    /// A slot for a new connection: below `tcp.maxConnections`, or beyond it when this pool
    /// has no connection at all.
    fn connection_slot(&self, cluster: ClusterPool<'_>) -> Option<Permit> {
        let mut state = self.lock();
        let slot = match cluster.try_connection() {
            Some(slot) => slot,
            None if state.open == 0 => cluster.connection_beyond_limit(),
            None => return None,
        };
        state.open += 1;
        Some(slot)
    }

    /// Opens a connection (counted in `open` already) within `tcp.connectTimeout`.
    async fn dial(
        self: &Arc<Self>,
        slot: Permit,
        limits: &PoolLimits,
        progress: &mut Progress,
    ) -> Result<Lease, SendError> {
        let mut opening = Opening {
            pool: self,
            state: Dial::Cancelled,
        };
        *progress = Progress::Connecting;
        let dialled = match self
            .dialer
            .connect_within(self.endpoint, limits.connect_timeout)
            .await
        {
            Ok(stream) => http1::handshake(TokioIo::new(stream))
                .await
                .map_err(Into::into),
            Err(error) => Err(error.into()),
        };
        let (sender, connection) = match dialled {
            Ok(connection) => connection,
            Err(error) => {
                let error: BoxError = error;
                debug!(endpoint = %self.endpoint, %error, "upstream connect failed");
                opening.state = Dial::Failed;
                return Err(SendError::ConnectFailure);
            }
        };
        opening.state = Dial::Open;
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.next_id
        };
        http1_connection::spawn(
            connection,
            Arc::downgrade(self),
            id,
            limits.http_idle_timeout,
            slot,
        );
        Ok(Lease {
            pool: Arc::clone(self),
            id,
            sender,
            served: 1,
            max_served: limits.max_requests_per_connection,
        })
    }

    /// Forgets a connection that is gone (or never came); `id` if it may be idle.
    fn forget(&self, id: Option<u64>, failed: bool) {
        let removed = {
            let mut state = self.lock();
            state.open -= 1;
            state.failed_dials += u64::from(failed);
            let at = id.and_then(|id| state.idle.iter().position(|idle| idle.id == id));
            at.map(|at| state.idle.remove(at)).is_some()
        };
        if removed {
            self.forget_idle_permit();
        }
        if failed {
            self.changed.notify_waiters();
        } else {
            self.changed.notify_one();
        }
    }

    /// Best effort: a request may hold the permit of a connection taken out of the idle list
    /// already; it then finds one idle connection fewer.
    fn forget_idle_permit(&self) {
        if let Ok(permit) = self.idle_permits.try_acquire() {
            permit.forget();
        }
    }
}

/// A connection being opened, counted in the pool: forgotten unless it opened (then its task
/// forgets it when it closes).
struct Opening<'a> {
    pool: &'a Http1Pool,
    state: Dial,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        match self.state {
            Dial::Open => {}
            Dial::Failed => self.pool.forget(None, true),
            Dial::Cancelled => self.pool.forget(None, false),
        }
    }
}

impl Owner for Http1Pool {
    fn expire_idle(&self, id: u64, timeout: Duration, now: Instant) -> Result<(), Instant> {
        let mut state = self.lock();
        // In use: idle again a whole timeout from now at the earliest.
        let Some(at) = state.idle.iter().position(|idle| idle.id == id) else {
            return Err(now + timeout);
        };
        let due = state.idle[at].since + timeout;
        if due > now {
            return Err(due);
        }
        state.idle.remove(at);
        drop(state);
        self.forget_idle_permit();
        Ok(())
    }

    fn closed(&self, id: u64) {
        self.forget(Some(id), false);
    }
}

impl Sleeps for Http1Pool {
    fn fall_asleep(&self, id: u64, now: Instant) -> Result<(Sender, Waking), Instant> {
        let mut state = self.lock();
        let Some(idle) = state.idle.iter_mut().find(|idle| idle.id == id) else {
            return Err(now + SLEEP_AFTER);
        };
        let due = idle.since + SLEEP_AFTER;
        if due > now {
            return Err(due);
        }
        let (wake, waking) = tokio::sync::oneshot::channel();
        match mem::replace(&mut idle.connection, IdleConnection::Asleep(wake)) {
            IdleConnection::Awake(sender) => Ok((sender, waking)),
            // Only its own task puts a connection to sleep, and it is awake.
            asleep @ IdleConnection::Asleep(_) => {
                idle.connection = asleep;
                Err(now + SLEEP_AFTER)
            }
        }
    }
}

impl Lease {
    /// Gives the connection back after its exchange: if the response was read to its end, to
    /// the first waiting request or the idle list; otherwise, or after
    /// `maxRequestsPerConnection` requests, it is dropped and hyper closes it.
    pub(super) fn finish(self, complete: bool) {
        let spent = self.max_served.is_some_and(|max| self.served >= max);
        if !complete || spent || self.sender.is_closed() {
            return;
        }
        self.pool.lock().idle.push(Idle {
            id: self.id,
            connection: IdleConnection::Awake(self.sender),
            served: self.served,
            since: Instant::now(),
        });
        self.pool.idle_permits.add_permits(1);
    }
}
