//! One plugin call: how it can fail ([`FailureKind`]) and its deadline,
//! counted in CPU time of the calling thread ([`CallDeadline`]). A leaf
//! module: the runtime, the upstream and the metrics all use it.
//!
//! wasmtime's epoch interruption is wall-clock: the epoch advances every
//! tick (1 ms while a call is in progress; 10 ms otherwise, see
//! [`crate::plugin::EPOCH_IDLE_TICK`]) whether or not the worker thread runs. On a
//! loaded host a worker preempted for a few ms in the middle of a call would
//! pass a 5 ms deadline without the plugin having run for 5 ms; the call
//! would trap, open the plugin's circuit breaker and send the next requests to
//! the fallback, so consistent-hash users would move between backends.
//!
//! So reaching the epoch deadline only starts a check. From then on the call
//! is looked at every tick and interrupted once it has used a further
//! [`grace`] of CPU time (half its budget, at least 1 ms) on the thread's CPU
//! clock (`CLOCK_THREAD_CPUTIME_ID`), or once [`wall_cap`] (four times its
//! budget, at least 50 ms) of wall time has passed since the deadline. A
//! runaway plugin is therefore cut after about 1.5 times its budget (plus up
//! to 10 ms if it started while the ticker was idle); a
//! preempted one is not cut for time it did not run. Plugins import no WASI
//! and cannot block, so the CPU time of the thread during a call is the
//! plugin's (and its host calls'). The check costs nothing on calls that end
//! within their budget: the CPU clock is read only after the deadline.

use std::time::{Duration, Instant};

/// Why a `select` call did not produce a usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The guest trapped (panic, unreachable, out of memory, stack overflow).
    Trap,
    /// The call overran its deadline and was interrupted.
    Deadline,
    /// The answer named a backend id outside the set, or an empty candidate list.
    BadAnswer,
}

impl FailureKind {
    /// `trap`, `deadline` or `bad_answer`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::BadAnswer => "bad_answer",
        }
    }
}

/// Least wall time a call is allowed past its deadline while preempted.
const MIN_WALL_CAP: Duration = Duration::from_millis(50);
/// Least CPU time a call may use past its deadline.
const MIN_GRACE: Duration = Duration::from_millis(1);

/// The deadline state of the call in progress on one store.
#[derive(Debug, Default)]
pub struct CallDeadline {
    budget: Duration,
    overrun: Option<Overrun>,
}

/// When the call passed its epoch deadline, on both clocks.
#[derive(Debug, Clone, Copy)]
struct Overrun {
    wall: Instant,
    cpu: Duration,
}

/// What to do with a call that is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it run for this many more epoch ticks, then check again.
    Continue(u64),
    /// Interrupt it: it used its CPU time, or waited past the wall cap.
    Expire,
}

/// CPU time the call may use after its epoch deadline: half its budget, at
/// least 1 ms.
pub fn grace(budget: Duration) -> Duration {
    (budget / 2).max(MIN_GRACE)
}

/// Wall time after the epoch deadline at which the call is interrupted
/// whatever its CPU use: four times its budget, at least 50 ms.
pub fn wall_cap(budget: Duration) -> Duration {
    (budget * 4).max(MIN_WALL_CAP)
}

impl CallDeadline {
    /// Start a call with a budget of `budget_ms` (ms, at least 1). Returns
    /// the epoch deadline to set, in ticks from now: one more than the
    /// budget, since the current tick is partly over.
    pub fn arm(&mut self, budget_ms: u64) -> u64 {
        let ms = budget_ms.max(1);
        self.budget = Duration::from_millis(ms);
        self.overrun = None;
        ms + 1
    }

    /// The epoch deadline was reached at wall time `now` with the thread's
    /// CPU clock at `cpu`: whether the call may go on.
    pub fn check(&mut self, now: Instant, cpu: Duration) -> Verdict {
        let Some(first) = self.overrun else {
            self.overrun = Some(Overrun { wall: now, cpu });
            return Verdict::Continue(1);
        };
        let used = cpu.saturating_sub(first.cpu);
        let waited = now.saturating_duration_since(first.wall);
        if used >= grace(self.budget) || waited >= wall_cap(self.budget) {
            Verdict::Expire
        } else {
            Verdict::Continue(1)
        }
    }
}

/// The calling thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`): time it has
/// run, in user and kernel mode.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn arm_gives_one_tick_more_than_the_budget() {
        let mut d = CallDeadline::default();
        assert_eq!(d.arm(5), 6);
        assert_eq!(d.arm(0), 2);
    }

    #[test]
    fn a_preempted_call_goes_on_until_the_wall_cap() {
        let mut d = CallDeadline::default();
        d.arm(5);
        let t0 = Instant::now();
        let cpu0 = Duration::from_secs(3);
        // Deadline reached; the thread then runs 0.04 ms per tick.
        assert_eq!(d.check(t0, cpu0), Verdict::Continue(1));
        for tick in 1..50u32 {
            let v = d.check(t0 + MS * tick, cpu0 + MS * tick / 25);
            assert_eq!(v, Verdict::Continue(1), "tick {tick}");
        }
        assert_eq!(d.check(t0 + MS * 50, cpu0 + MS * 2), Verdict::Expire);
    }

    #[test]
    fn a_running_call_is_cut_after_half_its_budget_more() {
        let mut d = CallDeadline::default();
        d.arm(10);
        let t0 = Instant::now();
        assert_eq!(d.check(t0, MS * 10), Verdict::Continue(1));
        assert_eq!(d.check(t0 + MS * 4, MS * 14), Verdict::Continue(1));
        assert_eq!(d.check(t0 + MS * 5, MS * 15), Verdict::Expire);
    }

    #[test]
    fn arming_forgets_the_last_overrun() {
        let mut d = CallDeadline::default();
        d.arm(2);
        let t0 = Instant::now();
        d.check(t0, MS);
        d.arm(2);
        // A fresh call: the first check only records.
        assert_eq!(d.check(t0 + MS * 100, MS * 100), Verdict::Continue(1));
    }

    #[test]
    fn grace_and_cap_have_floors() {
        assert_eq!(grace(MS), MS);
        assert_eq!(grace(MS * 10), MS * 5);
        assert_eq!(wall_cap(MS * 5), MS * 50);
        assert_eq!(wall_cap(MS * 1000), MS * 4000);
    }

    #[test]
    fn the_thread_cpu_clock_advances_with_work() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < MS * 20 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(thread_cpu_time() > before);
    }
}
