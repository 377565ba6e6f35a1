//! A future raced against a deadline on the request path, cheaper than
//! `tokio::time::timeout_at`: the timer is polled once, to register it, and afterwards only
//! asked whether it has fired (an atomic load). Polled again on every wake, as `timeout_at` and
//! `select!` poll it, it re-registers the task's waker and takes from the task's budget each
//! time: ~100 instructions a poll, and a request wakes its tasks several times.
//!
//! Sound where every poll comes with the waker of the first (a future its task polls, not one
//! handed between tasks): the timer wakes the waker registered at that first poll.

use std::{
    future::Future,
    pin::{pin, Pin},
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::{
    task::coop::unconstrained,
    time::{Instant, Sleep},
};

/// `future`'s output, or `None` when `deadline` passes first. Like `timeout_at`, the future is
/// polled first, so one that is ready when the deadline passes still gives its output.
pub(crate) fn within<F: Future>(deadline: Instant, future: F) -> Within<F> {
    Within {
        future,
        timer: tokio::time::sleep_until(deadline),
        registered: false,
    }
}

/// Completes at `deadline`, as `tokio::time::sleep_until` does, with its timer read as
/// [`within`] reads it.
pub(crate) async fn until(deadline: Instant) {
    within(deadline, std::future::pending::<()>()).await;
}

pin_project! {
    /// See [`within`].
    pub(crate) struct Within<F> {
        #[pin]
        future: F,
        #[pin]
        timer: Sleep,
        registered: bool,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let passed = if *this.registered {
            this.timer.is_elapsed()
        } else {
            *this.registered = true;
            // Unconstrained: with the task's budget spent (by `future`, say), a timer's poll
            // returns `Pending` without registering, and it would never fire.
            pin!(unconstrained(this.timer)).poll(cx).is_ready()
        };
        if passed {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_future_wins_before_the_deadline() {
        let start = Instant::now();
        let slept = within(
            start + Duration::from_secs(2),
            tokio::time::sleep(Duration::from_secs(1)),
        );
        assert_eq!(slept.await, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_a_future_that_is_woken_in_between() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(3);
        // Woken every 100 ms and never done: the polls after the first only look at the timer.
        let ticks = async {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            loop {
                interval.tick().await;
            }
        };
        let ended = tokio::time::timeout(Duration::from_secs(10), within(deadline, ticks));
        assert_eq!(ended.await, Ok(None::<()>), "the deadline was missed");
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    /// Spends the task's whole budget in its first poll (as a busy connection can), then
    /// stays pending.
    struct BudgetSpender {
        spent: bool,
    }

    impl Future for BudgetSpender {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if !self.spent {
                self.spent = true;
                while pin!(tokio::task::coop::consume_budget())
                    .poll(cx)
                    .is_ready()
                {}
            }
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_holds_when_the_future_spends_the_tasks_budget() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(3);
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            within(deadline, BudgetSpender { spent: false }),
        );
        assert_eq!(ended.await, Ok(None), "the deadline was missed");
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_passed_ends_a_pending_future_at_once() {
        let past = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(within(past, std::future::pending::<()>()).await, None);
    }
}
