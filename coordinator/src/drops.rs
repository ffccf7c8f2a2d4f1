//! What the coordinator refuses or drops on its control listener, as typed reasons, and
//! their counters. Each reason enum lists all its values, so a counter array is sized from
//! the enum and a label can only be a known reason. Shown in `GET /api/v1/status` under
//! `drops` and as `quicmesh_coordinator_*_dropped_total{reason}` at `GET /api/v1/metrics`.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// A drop reason: a closed set of values with stable labels.
pub trait Reason: Copy + 'static {
    /// Every value, in label order.
    const ALL: &'static [Self];
    /// Stable lower-case label for metrics, logs and tests.
    fn as_str(self) -> &'static str;
}

/// Why a connection to the control listener was refused or cut before it was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlDrop {
    /// Its source address already holds every certificate-less slot it may.
    SourceBusy,
    /// Every certificate-less slot of the listener is taken.
    ListenerBusy,
    /// The handshake did not complete within its deadline.
    HandshakeTimeout,
    /// The handshake failed (bad or refused client certificate, protocol error).
    HandshakeFailed,
    /// No complete first message within its deadline.
    RequestTimeout,
    /// A certificate-less connection asked for something other than enrollment.
    NotEnroll,
    /// This replica lost its database (fenced): the node is sent to another replica.
    Fenced,
}

impl Reason for ControlDrop {
    const ALL: &'static [Self] = &[
        Self::SourceBusy,
        Self::ListenerBusy,
        Self::HandshakeTimeout,
        Self::HandshakeFailed,
        Self::RequestTimeout,
        Self::NotEnroll,
        Self::Fenced,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::SourceBusy => "source_busy",
            Self::ListenerBusy => "listener_busy",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeFailed => "handshake_failed",
            Self::RequestTimeout => "request_timeout",
            Self::NotEnroll => "not_enroll",
            Self::Fenced => "fenced",
        }
    }
}

/// Why a node's punch request (`ControlUp::Punch`) was not passed on to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunchDrop {
    /// The same requester asked for the same target within the dedup window.
    Duplicate,
    /// The requester is over its rate.
    RequesterRate,
    /// The target is over its rate (many requesters asking it to dial).
    TargetRate,
    /// The target has no live control session.
    TargetOffline,
    /// The requester has no known address to dial back to.
    NoCandidates,
    /// The target's session queue is full.
    QueueFull,
}

impl Reason for PunchDrop {
    const ALL: &'static [Self] = &[
        Self::Duplicate,
        Self::RequesterRate,
        Self::TargetRate,
        Self::TargetOffline,
        Self::NoCandidates,
        Self::QueueFull,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::RequesterRate => "requester_rate",
            Self::TargetRate => "target_rate",
            Self::TargetOffline => "target_offline",
            Self::NoCandidates => "no_candidates",
            Self::QueueFull => "queue_full",
        }
    }
}

/// Why a datagram sent to the coordinator as a relay ([`crate::relay`]) was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDrop {
    /// The coordinator was started with `--no-relay`.
    Disabled,
    /// Its token is no session's on this replica, or it came from another address than
    /// that session's.
    SenderNotInSession,
    /// Its destination has no control session on this replica.
    DestinationNotInSession,
    /// A node asked to have its datagram sent back to itself.
    ToItself,
    /// The sender is over its rate (`relay::SENDER_RATE`).
    SenderOverRate,
    /// A path packet other than an authenticated relay request (`RelaySendAuth`; a
    /// relay node's plain `RelaySend` included), or an undecodable one.
    NotRelaySend,
    /// The socket refused the send (buffer full).
    SendFailed,
}

impl Reason for RelayDrop {
    const ALL: &'static [Self] = &[
        Self::Disabled,
        Self::SenderNotInSession,
        Self::DestinationNotInSession,
        Self::ToItself,
        Self::SenderOverRate,
        Self::NotRelaySend,
        Self::SendFailed,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::SenderNotInSession => "sender_not_in_session",
            Self::DestinationNotInSession => "destination_not_in_session",
            Self::ToItself => "to_itself",
            Self::SenderOverRate => "sender_over_rate",
            Self::NotRelaySend => "not_relay_send",
            Self::SendFailed => "send_failed",
        }
    }
}

/// One counter per value of `R`.
#[derive(Debug)]
pub struct Counters<R: Reason> {
    counts: Vec<AtomicU64>,
    _reason: PhantomData<R>,
}

impl<R: Reason + PartialEq> Default for Counters<R> {
    fn default() -> Self {
        Self {
            counts: R::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            _reason: PhantomData,
        }
    }
}

impl<R: Reason + PartialEq> Counters<R> {
    /// Counts one `reason`.
    pub fn count(&self, reason: R) {
        if let Some(i) = R::ALL.iter().position(|r| *r == reason) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The count of `reason`.
    pub fn get(&self, reason: R) -> u64 {
        R::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    /// Every reason with its count (zeros included).
    pub fn all(&self) -> BTreeMap<&'static str, u64> {
        R::ALL.iter().map(|r| (r.as_str(), self.get(*r))).collect()
    }

    /// Prometheus text lines for metric `name`.
    pub fn prometheus(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (r, n) in self.all() {
            let _ = writeln!(out, "{name}{{reason=\"{r}\"}} {n}");
        }
    }
}

/// The coordinator's drop counters.
#[derive(Debug, Default)]
pub struct Drops {
    pub control: Counters<ControlDrop>,
    pub punch: Counters<PunchDrop>,
    pub relay: Counters<RelayDrop>,
}

impl Drops {
    /// Every counter in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        self.control.prometheus(
            "quicmesh_coordinator_control_dropped_total",
            "Control connections refused or cut before they were served, by reason.",
            &mut out,
        );
        self.punch.prometheus(
            "quicmesh_coordinator_punch_dropped_total",
            "Punch requests not passed on, by reason.",
            &mut out,
        );
        self.relay.prometheus(
            "quicmesh_coordinator_relay_dropped_total",
            "Datagrams sent to the coordinator as a relay and not forwarded, by reason.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_sized_from_the_enum_and_labelled_by_reason() {
        let d = Drops::default();
        d.punch.count(PunchDrop::Duplicate);
        d.punch.count(PunchDrop::Duplicate);
        d.control.count(ControlDrop::SourceBusy);
        assert_eq!(d.punch.get(PunchDrop::Duplicate), 2);
        assert_eq!(d.punch.all().len(), PunchDrop::ALL.len());
        let text = d.prometheus();
        assert!(text.contains("quicmesh_coordinator_punch_dropped_total{reason=\"duplicate\"} 2"));
        assert!(
            text.contains("quicmesh_coordinator_control_dropped_total{reason=\"source_busy\"} 1")
        );
        assert!(text.contains("quicmesh_coordinator_punch_dropped_total{reason=\"queue_full\"} 0"));
    }
}
