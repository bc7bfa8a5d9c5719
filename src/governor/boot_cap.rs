//! The adaptive cap on sandboxes in their boot phases (clone, start, cloud_init, guest_agent).
//! Pure: it learns only from the boot outcomes it is given.
//!
//! Additive increase, multiplicative decrease. A boot that finished on time while the cap was in
//! use adds `increase / limit` (so the cap grows by `increase` per cap's worth of boots). A slow boot
//! or a boot timeout multiplies the cap by `decrease`, once per episode: boots that started before
//! the last decrease ran under the old cap and do not cut it again.
//!
//! A boot is slow when it took more than `slow_factor` × the fastest of the last `baseline_boots`
//! boots (on-time boots, and boots that had the host to themselves), or more than `expected`, or
//! when one of its phases used more than `timeout_fraction` of its timeout.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::governor::BootCapTuning;

/// How one boot went, as the governor saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootOutcome {
    /// When it began, on the governor's clock.
    pub started_at: Duration,
    /// Clone start until the guest agent answered (or until the timeout).
    pub seconds: f64,
    pub timed_out: bool,
    /// The most sandboxes booting at once while it booted, itself included.
    pub peak_booting: u32,
    /// The largest share of its timeout that one of its phases used (0..=1).
    pub worst_phase_share: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapChange {
    Grew,
    Shrank,
    Unchanged,
}

/// The verdict on the last boot, for the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootVerdict {
    pub seconds: f64,
    /// `on_time`, `slow` or `timeout`.
    pub verdict: String,
    pub why: String,
    pub change: CapChange,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BootCap {
    cap: f64,
    /// Durations of the last boots that finished, oldest first.
    recent: VecDeque<f64>,
    last_decrease: Option<Duration>,
    pub on_time: u64,
    pub slow: u64,
    pub timeouts: u64,
    pub last: Option<BootVerdict>,
}

impl BootCap {
    pub fn new(tuning: &BootCapTuning) -> Self {
        BootCap {
            cap: tuning.initial,
            recent: VecDeque::new(),
            last_decrease: None,
            on_time: 0,
            slow: 0,
            timeouts: 0,
            last: None,
        }
    }

    /// The cap as a real number (it moves in fractions).
    pub fn value(&self) -> f64 {
        self.cap
    }

    /// How many sandboxes may be in their boot phases at once.
    pub fn limit(&self, tuning: &BootCapTuning) -> u32 {
        // A hair of slack so that 3 + 1/3 + 1/3 + 1/3 counts as 4.
        let whole = (self.cap + 1e-9).floor().max(0.0).min(f64::from(u32::MAX)) as u32;
        whole.clamp(tuning.min, tuning.max.max(tuning.min))
    }

    /// The fastest recent boot, seconds.
    pub fn baseline(&self) -> Option<f64> {
        self.recent.iter().copied().reduce(f64::min)
    }

    /// A boot that takes longer than this is slow.
    pub fn on_time_seconds(&self, tuning: &BootCapTuning) -> f64 {
        let expected = tuning.expected.as_secs_f64();
        self.baseline()
            .map_or(expected, |base| (base * tuning.slow_factor).min(expected))
    }

    /// Keeps the cap inside new bounds after a tuning reload.
    pub fn clamp(&mut self, tuning: &BootCapTuning) {
        self.cap = self
            .cap
            .clamp(f64::from(tuning.min), f64::from(tuning.max.max(tuning.min)));
        let keep = tuning.baseline_boots as usize;
        while self.recent.len() > keep {
            self.recent.pop_front();
        }
    }

    /// Learns from one boot; `now` is when it ended, on the governor's clock.
    pub fn record(
        &mut self,
        tuning: &BootCapTuning,
        outcome: &BootOutcome,
        now: Duration,
    ) -> CapChange {
        let on_time_limit = self.on_time_seconds(tuning);
        let (verdict, why) = if outcome.timed_out {
            ("timeout", "a boot phase timed out".to_owned())
        } else if outcome.worst_phase_share > tuning.timeout_fraction {
            (
                "slow",
                format!(
                    "a boot phase used {:.0}% of its timeout (limit {:.0}%)",
                    outcome.worst_phase_share * 100.0,
                    tuning.timeout_fraction * 100.0
                ),
            )
        } else if outcome.seconds > on_time_limit {
            (
                "slow",
                format!(
                    "{:.1}s is over the {on_time_limit:.1}s a boot should take",
                    outcome.seconds
                ),
            )
        } else {
            (
                "on_time",
                format!("{:.1}s is within {on_time_limit:.1}s", outcome.seconds),
            )
        };
        // The baseline learns from on-time boots, and from boots that had the host to
        // themselves: those show what a boot costs now, even if the host got slower for good.
        // Slow boots under contention stay out, or overload would become the new normal.
        if !outcome.timed_out && (verdict == "on_time" || outcome.peak_booting <= 1) {
            self.recent.push_back(outcome.seconds);
            while self.recent.len() > tuning.baseline_boots as usize {
                self.recent.pop_front();
            }
        }
        let change = if verdict == "on_time" {
            self.on_time += 1;
            // Grow only when the cap was what held boots back: a cap never reached says nothing
            // about whether the host could take more.
            if outcome.peak_booting >= self.limit(tuning) {
                let before = self.cap;
                let step = tuning.increase / f64::from(self.limit(tuning));
                self.cap = (self.cap + step).min(f64::from(tuning.max));
                if self.cap > before {
                    CapChange::Grew
                } else {
                    CapChange::Unchanged
                }
            } else {
                CapChange::Unchanged
            }
        } else {
            if outcome.timed_out {
                self.timeouts += 1;
            } else {
                self.slow += 1;
            }
            let fresh = self.last_decrease.is_none_or(|at| outcome.started_at >= at);
            if fresh {
                let before = self.cap;
                self.cap = (self.cap * tuning.decrease).max(f64::from(tuning.min));
                self.last_decrease = Some(now);
                if self.cap < before {
                    CapChange::Shrank
                } else {
                    CapChange::Unchanged
                }
            } else {
                CapChange::Unchanged
            }
        };
        self.last = Some(BootVerdict {
            seconds: outcome.seconds,
            verdict: verdict.to_owned(),
            why,
            change,
        });
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuning() -> BootCapTuning {
        BootCapTuning {
            initial: 2.0,
            min: 1,
            max: 6,
            increase: 1.0,
            decrease: 0.5,
            slow_factor: 2.0,
            baseline_boots: 5,
            expected: Duration::from_secs(60),
            timeout_fraction: 0.5,
        }
    }

    fn boot(started: u64, seconds: f64, peak: u32) -> BootOutcome {
        BootOutcome {
            started_at: Duration::from_secs(started),
            seconds,
            timed_out: false,
            peak_booting: peak,
            worst_phase_share: 0.1,
        }
    }

    fn at(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn grows_additively_while_boots_are_on_time_at_the_cap() {
        let t = tuning();
        let mut cap = BootCap::new(&t);
        assert_eq!(cap.limit(&t), 2);
        // Two boots at the cap: +1/2 each, so +1 per cap's worth.
        assert_eq!(cap.record(&t, &boot(0, 5.0, 2), at(5)), CapChange::Grew);
        assert_eq!(cap.record(&t, &boot(0, 5.0, 2), at(5)), CapChange::Grew);
        assert_eq!(cap.limit(&t), 3);
        for i in 0..3 {
            cap.record(&t, &boot(10 + i, 5.5, 3), at(16 + i));
        }
        assert_eq!(cap.limit(&t), 4);
        // It never passes max.
        for i in 0..100 {
            cap.record(&t, &boot(20 + i, 5.0, 6), at(26 + i));
        }
        assert_eq!(cap.limit(&t), 6);
        assert!((cap.value() - 6.0).abs() < 1e-9);
    }

    #[test]
    fn does_not_grow_when_the_cap_was_never_reached() {
        let t = tuning();
        let mut cap = BootCap::new(&t);
        for i in 0..50 {
            assert_eq!(
                cap.record(&t, &boot(i * 10, 5.0, 1), at(i * 10 + 5)),
                CapChange::Unchanged
            );
        }
        assert_eq!(cap.limit(&t), 2);
        assert_eq!(cap.on_time, 50);
    }

    #[test]
    fn shrinks_multiplicatively_on_a_slow_boot_once_per_episode() {
        let t = BootCapTuning {
            initial: 6.0,
            ..tuning()
        };
        let mut cap = BootCap::new(&t);
        cap.record(&t, &boot(0, 5.0, 1), at(5));
        assert!((cap.on_time_seconds(&t) - 10.0).abs() < 1e-9);
        // Six boots started together at t=10; all come back slow. Only the first one cuts.
        assert_eq!(
            cap.record(&t, &boot(10, 25.0, 6), at(35)),
            CapChange::Shrank
        );
        assert_eq!(cap.limit(&t), 3);
        for _ in 0..5 {
            assert_eq!(
                cap.record(&t, &boot(10, 26.0, 6), at(36)),
                CapChange::Unchanged
            );
        }
        assert_eq!(cap.limit(&t), 3);
        // A boot that started after the cut and is still slow cuts again, down to min.
        assert_eq!(
            cap.record(&t, &boot(40, 12.0, 3), at(52)),
            CapChange::Shrank
        );
        assert_eq!(
            cap.record(&t, &boot(53, 12.0, 1), at(65)),
            CapChange::Shrank
        );
        assert_eq!(cap.limit(&t), 1);
        assert_eq!(
            cap.record(&t, &boot(66, 12.0, 1), at(78)),
            CapChange::Unchanged
        );
        assert_eq!(cap.limit(&t), 1, "never below min");
        assert_eq!(cap.slow, 9);
    }

    #[test]
    fn a_timeout_or_a_phase_near_its_timeout_is_slow() {
        let t = BootCapTuning {
            initial: 4.0,
            ..tuning()
        };
        let mut cap = BootCap::new(&t);
        let timeout = BootOutcome {
            timed_out: true,
            ..boot(0, 15.0, 4)
        };
        assert_eq!(cap.record(&t, &timeout, at(15)), CapChange::Shrank);
        assert_eq!(cap.limit(&t), 2);
        assert_eq!(cap.timeouts, 1);
        assert!(cap.baseline().is_none(), "a timeout is not a boot time");
        let near = BootOutcome {
            worst_phase_share: 0.7,
            ..boot(20, 4.0, 2)
        };
        assert_eq!(cap.record(&t, &near, at(24)), CapChange::Shrank);
        assert_eq!(cap.last.as_ref().unwrap().verdict, "slow");
        assert!(cap.last.as_ref().unwrap().why.contains("70%"));
    }

    #[test]
    fn without_a_baseline_the_expected_time_judges_and_the_baseline_follows_recent_boots() {
        let t = tuning();
        let mut cap = BootCap::new(&t);
        assert!((cap.on_time_seconds(&t) - 60.0).abs() < 1e-9);
        cap.record(&t, &boot(0, 3.0, 1), at(3));
        assert!((cap.on_time_seconds(&t) - 6.0).abs() < 1e-9);
        // After `baseline_boots` slower boots the old fast one has left the window.
        for i in 0..5 {
            cap.record(&t, &boot(10 + i, 5.0, 1), at(15 + i));
        }
        assert_eq!(cap.baseline(), Some(5.0));
    }
}
