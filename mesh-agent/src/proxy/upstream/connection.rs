//! The task that drives one pooled upstream connection: hyper's connection future until it
//! ends, the connection's idle timeout, and what its end gives back (its slot of
//! `tcp.maxConnections`, its place in the pool).

use std::{future::Future, sync::Weak, time::Duration};

use tokio::time::Instant;

use crate::{engine::Permit, proxy::deadline::within};

/// How opening a connection ended, for the pool that counted it while it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dial {
    /// It is open: its task forgets it when it closes.
    Open,
    /// The dial failed: the requests waiting for it fail too.
    Failed,
    /// The request that opened it went away first: another may open one.
    Cancelled,
}

/// What a connection's task asks of the pool that holds the connection.
pub(super) trait Owner: Send + Sync + 'static {
    /// At an idle check, `now`: `Ok` when connection `id` has been idle for `timeout` and was
    /// taken out of the pool (no request can pick it any more); otherwise when to check again.
    fn expire_idle(&self, id: u64, timeout: Duration, now: Instant) -> Result<(), Instant>;

    /// Connection `id` is closed: forget it, and let a waiting request open another.
    fn closed(&self, id: u64);
}

/// Runs `life` (driving one connection, [`drive`] or HTTP/1's sleeping cycle) on a task of its
/// own; when it ends, `slot` (of `tcp.maxConnections`) is released and the pool forgets `id`.
pub(super) fn spawn<O: Owner>(
    owner: Weak<O>,
    id: u64,
    slot: Permit,
    life: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        life.await;
        // The slot first, so the request this wakes can take it.
        drop(slot);
        if let Some(owner) = owner.upgrade() {
            owner.closed(id);
        }
    });
}

/// Drives `connection` until it ends or stays idle for `idle_timeout` (`http.idleTimeout`;
/// `None`: never closed for idleness). Boxed by the caller: a future keeps its arguments for
/// its whole life, so pinning one inside would hold hyper's connection twice in the task.
pub(super) async fn drive<C: Future + Unpin, O: Owner>(
    mut connection: C,
    owner: Weak<O>,
    id: u64,
    idle_timeout: Option<Duration>,
) {
    let Some(timeout) = idle_timeout else {
        connection.await;
        return;
    };
    let first = Instant::now() + timeout;
    // Expired: dropping hyper's connection closes the socket.
    drive_until(&mut connection, &owner, first, |pool, now| {
        pool.expire_idle(id, timeout, now)
    })
    .await;
}

/// Drives `connection` until it ends (`None`) or the pool, asked at `first` and then at each
/// instant it answers with, gives its verdict on it (`Some`): taken out idle, or put to sleep.
pub(super) async fn drive_until<C: Future + Unpin, O, T>(
    connection: &mut C,
    owner: &Weak<O>,
    first: Instant,
    mut ask: impl FnMut(&O, Instant) -> Result<T, Instant>,
) -> Option<T> {
    let mut check = first;
    loop {
        if within(check, &mut *connection).await.is_some() {
            return None;
        }
        let Some(pool) = owner.upgrade() else {
            // The pool is gone with its handles, so hyper ends the connection once its
            // requests in flight are done.
            connection.await;
            return None;
        };
        match ask(&pool, Instant::now()) {
            Ok(verdict) => return Some(verdict),
            Err(next) => check = next,
        }
    }
}
