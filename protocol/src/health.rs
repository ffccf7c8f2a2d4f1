//! Health-check state: rise/fall thresholds over check results, with `now` kept out.
//!
//! A service with a check starts critical; its first passing result makes it passing (so
//! a healthy service is routable after one interval, not `rise` of them). After that it
//! changes state only after `fall` failures in a row (passing -> critical) or `rise`
//! successes in a row (critical -> passing): one lost probe on a lossy path does not flap
//! the instance.

use serde::{Deserialize, Serialize};

use crate::ident::ServiceName;

/// Most bytes of check output kept and reported.
pub const MAX_OUTPUT: usize = 512;

/// A service's health as nodes report it and snapshots carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Critical,
}

impl Health {
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Critical => "critical",
        }
    }
}

/// Rise/fall state of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checker {
    rise: u32,
    fall: u32,
    state: Health,
    /// Results in a row that disagree with `state`.
    against: u32,
    /// No result seen yet.
    fresh: bool,
}

impl Checker {
    /// `rise` and `fall` are at least 1 (smaller values are taken as 1).
    pub fn new(rise: u32, fall: u32) -> Self {
        Checker {
            rise: rise.max(1),
            fall: fall.max(1),
            state: Health::Critical,
            against: 0,
            fresh: true,
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Feeds one result; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<Health> {
        let result = if passed {
            Health::Passing
        } else {
            Health::Critical
        };
        if std::mem::replace(&mut self.fresh, false) {
            self.against = 0;
            let changed = result != self.state;
            self.state = result;
            return changed.then_some(result);
        }
        if result == self.state {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let needed = match result {
            Health::Passing => self.rise,
            Health::Critical => self.fall,
        };
        if self.against >= needed {
            self.state = result;
            self.against = 0;
            return Some(result);
        }
        None
    }
}

/// One service's check result as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCheck {
    pub service: ServiceName,
    pub health: Health,
    /// The last check's output (truncated to [`MAX_OUTPUT`] bytes).
    pub output: String,
}

/// `s` cut to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let mut c = Checker::new(2, 3);
        assert_eq!(c.state(), Health::Critical);
        assert_eq!(c.observe(true), Some(Health::Passing), "first pass routes");
        // Two failures (< fall 3) do not flap; a pass resets the count.
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(
            c.observe(false),
            Some(Health::Critical),
            "third failure in a row"
        );
        // One pass (< rise 2) is not enough to come back.
        assert_eq!(c.observe(true), None);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.observe(true), None);
        assert_eq!(c.observe(true), Some(Health::Passing));
    }

    #[test]
    fn a_first_failure_stays_critical_without_a_transition() {
        let mut c = Checker::new(1, 1);
        assert_eq!(c.observe(false), None);
        assert_eq!(c.state(), Health::Critical);
        assert_eq!(c.observe(true), Some(Health::Passing));
        assert_eq!(c.observe(false), Some(Health::Critical), "fall 1");
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
