//! The drain's signal as a connection's task races it against the connection, cheaper than
//! `CancellationToken::cancelled`: that future takes the token's lock on every poll to check
//! its waker, and a connection's select polls it each time the connection wakes (twice a
//! request, ~140 instructions each). This one registers at its first poll and afterwards
//! reads the token's flag (an atomic load) while the same task polls it, as
//! [`within`](super::deadline::within) reads its timer.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
};

use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Resolves once `token` is cancelled (the drain has started), and again each time it is polled
/// after: a connection's successive selects share one.
pub(crate) fn drained(token: &CancellationToken) -> Drained<'_> {
    Drained {
        token,
        cancelled: token.cancelled(),
        registered: None,
    }
}

pin_project! {
    /// See [`drained`].
    pub(crate) struct Drained<'a> {
        token: &'a CancellationToken,
        #[pin]
        cancelled: WaitForCancellationFuture<'a>,
        // The waker the token wakes: while polls come with it, the registration stands.
        registered: Option<Waker>,
    }
}

impl Future for Drained<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.token.is_cancelled() {
            return Poll::Ready(());
        }
        if let Some(waker) = this.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::poll_fn,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        task::Wake,
    };

    use super::*;

    /// Counts its wakes.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_with(drained: Pin<&mut Drained<'_>>, counter: &Arc<Counter>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(counter));
        drained.poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_drain_started_before_the_first_poll_is_seen_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let drained = std::pin::pin!(drained(&token));
        assert!(poll_with(drained, &Arc::default()).is_ready());
    }

    #[test]
    fn the_drain_wakes_the_task_that_polled_and_resolves() {
        let token = CancellationToken::new();
        let task = Arc::new(Counter::default());
        let mut drained = std::pin::pin!(drained(&token));
        assert!(poll_with(drained.as_mut(), &task).is_pending());
        assert!(
            drained.as_mut().project().registered.is_some(),
            "later polls by the same task read the flag alone"
        );
        assert!(poll_with(drained.as_mut(), &task).is_pending());
        token.cancel();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(poll_with(drained.as_mut(), &task).is_ready());
        assert!(poll_with(drained, &task).is_ready());
    }

    #[test]
    fn a_new_task_polling_it_is_woken_instead() {
        let token = CancellationToken::new();
        let (first, second) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let mut drained = std::pin::pin!(drained(&token));
        assert!(poll_with(drained.as_mut(), &first).is_pending());
        assert!(poll_with(drained.as_mut(), &second).is_pending());
        token.cancel();
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(poll_with(drained, &second).is_ready());
    }

    #[tokio::test]
    async fn a_child_token_cancelled_with_its_parent_resolves() {
        let parent = CancellationToken::new();
        let child = parent.child_token();
        let mut drained = std::pin::pin!(drained(&child));
        assert!(poll_fn(|cx| Poll::Ready(drained.as_mut().poll(cx).is_pending())).await);
        parent.cancel();
        drained.await;
    }
}
