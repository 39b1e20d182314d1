//! The response-head deadline (`response_timeout_ms`) on a timer that a
//! downstream connection keeps between its requests.
//!
//! A fresh `tokio::time::timeout` per attempt registers a timer in tokio's
//! wheel when the attempt first waits and removes it when the response
//! comes: two wheel updates under the driver's lock, and a precise clock
//! read, for a deadline that almost never fires. Here a connection's
//! [`LazyTimer`] stays armed between requests, and a request whose deadline
//! is later than the armed one keeps it as it is: when it fires early, it is
//! re-armed for the deadline that applies then. Under load a connection's
//! timer is thus reset about once per `response_timeout_ms`, not once per
//! request. This is NGINX's lazy timer (`NGX_TIMER_LAZY_DELAY` in
//! `ngx_event_add_timer`: a timer is not moved for a change under 300 ms),
//! taken to its end: an armed timer is only ever moved earlier, or re-armed
//! once it fires.
//!
//! Deadlines are in the coarse milliseconds of [`crate::conn::now_ms`], so a
//! response timeout may fire up to one clock tick (1–10 ms) early, as the
//! downstream timeouts may.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Sleep;

/// A timer kept armed across deadlines (see the module docs): 16 bytes, its
/// tokio timer (about 100 bytes) boxed.
#[derive(Debug)]
pub(crate) struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
    /// The deadline it is armed for, in [`crate::conn::now_ms`]'s ms.
    armed_ms: u64,
}

/// The deadline passed before the future it bounded was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elapsed;

impl LazyTimer {
    /// A timer armed for `at_ms` (in [`crate::conn::now_ms`]'s ms).
    pub(crate) fn new(at_ms: u64) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                crate::conn::instant_at_ms(at_ms),
            ))),
            armed_ms: at_ms,
        }
    }

    /// Ready once `at_ms` has passed. An armed timer that fires no later
    /// than `at_ms` is kept (and re-armed for `at_ms` when it fires); one
    /// armed later, or already fired, is reset to `at_ms`.
    pub(crate) fn poll_until(&mut self, cx: &mut Context<'_>, at_ms: u64) -> Poll<()> {
        loop {
            if self.sleep.is_elapsed() || at_ms < self.armed_ms {
                self.sleep.as_mut().reset(tokio::time::Instant::from_std(
                    crate::conn::instant_at_ms(at_ms),
                ));
                self.armed_ms = at_ms;
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if self.armed_ms >= at_ms => return Poll::Ready(()),
                // It fired for an earlier deadline: re-armed on the next turn.
                Poll::Ready(()) => {}
            }
        }
    }

    /// `future`, bounded by `at_ms`: its output, or [`Elapsed`] once the
    /// deadline passed first. The future is polled before the timer, so a
    /// ready future wins over a passed deadline.
    #[allow(clippy::manual_async_fn)] // an `async fn` would hold its arguments twice
    pub(crate) fn within<F: Future>(
        &mut self,
        at_ms: u64,
        future: F,
    ) -> impl Future<Output = Result<F::Output, Elapsed>> {
        async move {
            let mut future = std::pin::pin!(future);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = future.as_mut().poll(cx) {
                    return Poll::Ready(Ok(out));
                }
                self.poll_until(cx, at_ms).map(|()| Err(Elapsed))
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::now_ms;
    use std::time::Duration;

    #[tokio::test]
    async fn a_ready_future_is_not_cut_and_a_slow_one_is_cut_at_the_deadline() {
        let mut timer = LazyTimer::new(now_ms() + 60_000);
        let at = now_ms() + 60_000;
        assert_eq!(timer.within(at, async { 7 }).await, Ok(7));
        let at = now_ms() + 50;
        let cut = tokio::time::timeout(
            Duration::from_secs(5),
            timer.within(at, std::future::pending::<()>()),
        )
        .await
        .expect("cut at its own deadline, not the armed one 60 s away");
        assert_eq!(cut, Err(Elapsed));
        assert!(now_ms() + 10 >= at, "not cut long before its deadline");
    }

    #[tokio::test]
    async fn a_timer_armed_early_is_kept_and_re_armed_when_it_fires() {
        // Armed for 100 ms from now; the next deadline is 400 ms away: the
        // timer is kept, fires at 100 ms, and must then wait on, not cut.
        let start = now_ms();
        let mut timer = LazyTimer::new(start + 100);
        let at = start + 400;
        let cut = tokio::time::timeout(
            Duration::from_secs(5),
            timer.within(at, std::future::pending::<()>()),
        )
        .await
        .expect("cut at the later deadline");
        assert_eq!(cut, Err(Elapsed));
        assert!(
            now_ms() + 10 >= at,
            "cut at the deadline armed before ({} ms in), not at its own",
            now_ms() - start
        );
        // Fired: the next use re-arms it.
        let at = now_ms() + 30;
        assert_eq!(
            timer.within(at, std::future::pending::<()>()).await,
            Err(Elapsed)
        );
    }
}
