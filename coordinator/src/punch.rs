//! Which punch requests are passed on. A node asks the coordinator to have a peer dial it
//! back (`ControlUp::Punch`); each request passed on makes the target send QUIC Initials
//! to the requester's candidate addresses, which the requester chose. So requests are
//! deduplicated per (requester, target) and rate-limited per requester and per target:
//! one node cannot make the mesh dial a victim more than a bounded number of times.
//! Pure: the caller passes `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::drops::PunchDrop;

/// The same requester asking for the same target again within this is a duplicate.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(2);
/// Requests passed on per requester in a burst (a node starting up dials many peers).
pub const REQUESTER_BURST: u32 = 16;
/// Sustained requests passed on per requester, per second.
pub const REQUESTER_RATE: f64 = 2.0;
/// Requests passed on per target in a burst (many nodes starting at once).
pub const TARGET_BURST: u32 = 32;
/// Sustained requests passed on per target, per second.
pub const TARGET_RATE: f64 = 4.0;
/// Entries kept before expired ones are swept (every key is a node in session, so this
/// is a sweep threshold, not what bounds the tables).
const SWEEP_AT: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn level(&self, now: Instant, burst: u32, rate: f64) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * rate).min(f64::from(burst))
    }
}

/// Dedup and rate state of punch requests.
#[derive(Debug, Default)]
pub struct PunchLimiter {
    pairs: HashMap<(String, String), Instant>,
    requesters: HashMap<String, Bucket>,
    targets: HashMap<String, Bucket>,
}

impl PunchLimiter {
    /// Decides whether `from`'s request that `to` dial it back is passed on at `now`;
    /// an admitted request is charged to both rates.
    pub fn admit(&mut self, now: Instant, from: &str, to: &str) -> Result<(), PunchDrop> {
        self.sweep(now);
        let key = (from.to_string(), to.to_string());
        if self
            .pairs
            .get(&key)
            .is_some_and(|t| now.saturating_duration_since(*t) < DEDUP_WINDOW)
        {
            return Err(PunchDrop::Duplicate);
        }
        let full = |burst: u32| Bucket {
            tokens: f64::from(burst),
            at: now,
        };
        let r = self
            .requesters
            .get(from)
            .copied()
            .unwrap_or_else(|| full(REQUESTER_BURST))
            .level(now, REQUESTER_BURST, REQUESTER_RATE);
        if r < 1.0 {
            return Err(PunchDrop::RequesterRate);
        }
        let t = self
            .targets
            .get(to)
            .copied()
            .unwrap_or_else(|| full(TARGET_BURST))
            .level(now, TARGET_BURST, TARGET_RATE);
        if t < 1.0 {
            return Err(PunchDrop::TargetRate);
        }
        self.requesters.insert(
            from.to_string(),
            Bucket {
                tokens: r - 1.0,
                at: now,
            },
        );
        self.targets.insert(
            to.to_string(),
            Bucket {
                tokens: t - 1.0,
                at: now,
            },
        );
        self.pairs.insert(key, now);
        Ok(())
    }

    /// Forgets what no longer matters: dedup entries past their window, buckets full again.
    fn sweep(&mut self, now: Instant) {
        if self.pairs.len() + self.requesters.len() + self.targets.len() < SWEEP_AT {
            return;
        }
        self.pairs
            .retain(|_, t| now.saturating_duration_since(*t) < DEDUP_WINDOW);
        self.requesters.retain(|_, b| {
            b.level(now, REQUESTER_BURST, REQUESTER_RATE) < f64::from(REQUESTER_BURST)
        });
        self.targets
            .retain(|_, b| b.level(now, TARGET_BURST, TARGET_RATE) < f64::from(TARGET_BURST));
    }

    /// Entries held (for the bound test).
    pub fn len(&self) -> usize {
        self.pairs.len() + self.requesters.len() + self.targets.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_at_one_target_is_passed_on_once_per_dedup_window() {
        let mut l = PunchLimiter::default();
        let t0 = Instant::now();
        let mut passed = 0;
        let mut dup = 0;
        for i in 0..1000u32 {
            match l.admit(t0 + Duration::from_micros(i.into()), "evil", "victim-peer") {
                Ok(()) => passed += 1,
                Err(PunchDrop::Duplicate) => dup += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((passed, dup), (1, 999));
        // After the window, once more.
        assert_eq!(l.admit(t0 + DEDUP_WINDOW, "evil", "victim-peer"), Ok(()));
        // Its allowed twin: another requester asking the same target is not a duplicate.
        assert_eq!(l.admit(t0, "honest", "victim-peer"), Ok(()));
    }

    #[test]
    fn a_requester_sweeping_every_target_is_held_to_its_rate() {
        let mut l = PunchLimiter::default();
        let t0 = Instant::now();
        let mut passed = 0u32;
        let mut limited = 0u32;
        // 10 s of a flood: 100 requests a second, each at a distinct target.
        for i in 0..1000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            match l.admit(now, "evil", &format!("peer-{i}")) {
                Ok(()) => passed += 1,
                Err(PunchDrop::RequesterRate) => limited += 1,
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        let most = REQUESTER_BURST + (10.0 * REQUESTER_RATE) as u32;
        assert!(passed <= most, "{passed} passed on, at most {most}");
        assert!(passed >= REQUESTER_BURST, "the burst passes: {passed}");
        assert_eq!(passed + limited, 1000);
        // Another node is not held to the flooder's rate.
        assert_eq!(
            l.admit(t0 + Duration::from_secs(10), "honest", "peer-1"),
            Ok(())
        );
    }

    #[test]
    fn many_requesters_at_one_target_are_held_to_its_rate() {
        let mut l = PunchLimiter::default();
        let t0 = Instant::now();
        let passed = (0..200)
            .filter(|i| l.admit(t0, &format!("n{i}"), "target").is_ok())
            .count();
        assert_eq!(passed, TARGET_BURST as usize);
        assert_eq!(l.admit(t0, "n999", "target"), Err(PunchDrop::TargetRate));
        // Refills at its rate.
        assert_eq!(
            l.admit(t0 + Duration::from_secs(1), "n999", "target"),
            Ok(())
        );
    }

    #[test]
    fn state_is_swept_when_it_grows() {
        let mut l = PunchLimiter::default();
        let t0 = Instant::now();
        for i in 0..3000 {
            let _ = l.admit(t0, &format!("a{i}"), &format!("b{i}"));
        }
        assert!(l.len() >= SWEEP_AT);
        let _ = l.admit(t0 + Duration::from_secs(60), "x", "y");
        assert!(l.len() <= 3, "{} entries after a sweep", l.len());
    }
}
