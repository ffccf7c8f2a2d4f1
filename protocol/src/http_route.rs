//! HTTP traffic management, pure: which route a request takes, which subset of instances
//! it goes to, whether a failed try may be tried again (and whether the retry budget
//! allows it), when an instance is ejected and for how long, and the token bucket of a
//! rate limit. Time is passed in (`now`), random draws too; nothing here reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One route of an `http` upstream: requests it matches go to the split's subsets, with
/// its timeouts, retries and faults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub name: String,
    pub matches: RouteMatch,
    /// Weighted subsets; empty: every instance.
    pub split: Vec<Split>,
    /// Until the response head, all tries included (504 after).
    pub timeout: Duration,
    /// Until one try's response head (the try fails after; retried when allowed).
    pub per_try_timeout: Option<Duration>,
    /// How many times a failed request may be tried again.
    pub retries: u32,
    /// Statuses that make a try failed for retrying (of idempotent requests).
    pub retry_on: Vec<u16>,
    /// gRPC statuses (in a trailers-only answer) that may be retried, whatever the method.
    pub retry_grpc: Vec<u32>,
    pub fault: Option<Fault>,
}

/// What a route matches; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    /// A normalised path prefix, on segment boundaries: `/api` matches `/api` and
    /// `/api/x`, not `/apix`.
    pub path_prefix: Option<String>,
    /// Header names (lower case) with the exact value each must have.
    pub headers: Vec<(String, String)>,
}

/// A subset of instances (those whose node labels include all of `labels`) and its
/// share of the route's requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Split {
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
}

/// Faults injected for chaos tests: a delay before some requests, an answer instead of
/// the service for others.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Duration,
    /// Share of requests delayed, 0..=100.
    pub delay_percent: f64,
    /// The status answered instead of the service.
    pub abort_status: u16,
    /// Share of requests aborted, 0..=100.
    pub abort_percent: f64,
}

/// The default request timeout: to the response head, all tries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Statuses retried by default (of idempotent requests).
pub const DEFAULT_RETRY_ON: [u16; 3] = [502, 503, 504];
/// gRPC UNAVAILABLE: the one status retried by default.
pub const GRPC_UNAVAILABLE: u32 = 14;

impl Route {
    /// The route every request takes when no other matches.
    pub fn fallback() -> Self {
        Self {
            name: "default".into(),
            matches: RouteMatch::default(),
            split: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            per_try_timeout: None,
            retries: 0,
            retry_on: DEFAULT_RETRY_ON.to_vec(),
            retry_grpc: vec![GRPC_UNAVAILABLE],
            fault: None,
        }
    }

    /// Whether the route takes a request for `path` with `headers` (names lower case).
    pub fn takes(&self, path: &str, headers: &[(&str, &str)]) -> bool {
        let prefix = self.matches.path_prefix.as_deref().is_none_or(|p| {
            let p = p.trim_end_matches('/');
            p.is_empty()
                || path == p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        prefix
            && self.matches.headers.iter().all(|(name, value)| {
                headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && v.trim() == value)
            })
    }

    /// The subset for a request, by `roll` (uniform in `0..u32::MAX`); `None`: every
    /// instance.
    pub fn subset(&self, roll: u32) -> Option<&Split> {
        let total: u64 = self.split.iter().map(|s| u64::from(s.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
        for s in &self.split {
            if at < u64::from(s.weight) {
                return Some(s);
            }
            at -= u64::from(s.weight);
        }
        self.split.last()
    }

    /// Whether a try that answered `status` (with `grpc_status` in its head, if any)
    /// failed in a way that may be tried again, for a request with `method`.
    pub fn retryable(&self, method: &str, status: u16, grpc_status: Option<u32>) -> bool {
        if let Some(g) = grpc_status {
            return self.retry_grpc.contains(&g);
        }
        idempotent(method) && self.retry_on.contains(&status)
    }
}

/// Picks the first route that takes the request.
pub fn select<'a>(routes: &'a [Route], path: &str, headers: &[(&str, &str)]) -> Option<&'a Route> {
    routes.iter().find(|r| r.takes(path, headers))
}

/// Whether a request with `method` may be sent twice without changing its effect
/// (RFC 9110 9.2.2).
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Whether an instance's labels include every label of `subset`.
pub fn in_subset(
    subset: &BTreeMap<String, String>,
    labels: impl Fn(&str) -> Option<String>,
) -> bool {
    subset
        .iter()
        .all(|(k, v)| labels(k).as_deref() == Some(v.as_str()))
}

/// A retry budget: retries may add at most `ratio` of the requests of the last `window`,
/// plus `min_per_window` retries (so a quiet upstream can still retry).
#[derive(Debug, Clone)]
pub struct Budget {
    pub ratio: f64,
    pub min_per_window: u32,
    pub window: Duration,
    /// (window start, requests, retries) of the current and the previous window.
    current: (Option<Instant>, u64, u64),
    previous: (u64, u64),
}

impl Budget {
    pub fn new(ratio: f64, min_per_window: u32, window: Duration) -> Self {
        Self {
            ratio,
            min_per_window,
            window,
            current: (None, 0, 0),
            previous: (0, 0),
        }
    }

    fn roll(&mut self, now: Instant) {
        match self.current.0 {
            Some(start) if now.saturating_duration_since(start) < self.window => {}
            Some(start) if now.saturating_duration_since(start) < self.window * 2 => {
                self.previous = (self.current.1, self.current.2);
                self.current = (Some(now), 0, 0);
            }
            _ => {
                self.previous = (0, 0);
                self.current = (Some(now), 0, 0);
            }
        }
    }

    /// Counts a request (its first try).
    pub fn request(&mut self, now: Instant) {
        self.roll(now);
        self.current.1 += 1;
    }

    /// Whether a retry may go now; counts it when it may.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        self.roll(now);
        let requests = self.current.1 + self.previous.0;
        let retries = self.current.2 + self.previous.1;
        let allowed = f64::from(self.min_per_window) + self.ratio * requests as f64;
        if (retries as f64) < allowed {
            self.current.2 += 1;
            true
        } else {
            false
        }
    }
}

/// Outlier ejection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EjectionPolicy {
    /// Consecutive failures (5xx answers or unreachable) that eject an instance.
    pub consecutive_failures: u32,
    /// The first ejection's length; each next one of the same instance doubles it.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

/// One instance's outlier state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outlier {
    failures: u32,
    ejections: u32,
    until: Option<Instant>,
}

/// What a result did to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ejected {
    /// Nothing changed.
    No,
    /// Ejected now, for this long.
    For(Duration),
    /// It would be ejected, but it is the last instance in service: kept.
    KeptAsLast,
}

impl Outlier {
    /// Whether the instance is out of service at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Records a try's result. `others` is how many other instances are in service: the
    /// last one is never ejected.
    pub fn record(
        &mut self,
        ok: bool,
        policy: &EjectionPolicy,
        others: usize,
        now: Instant,
    ) -> Ejected {
        if ok {
            self.failures = 0;
            return Ejected::No;
        }
        if self.ejected(now) {
            return Ejected::No;
        }
        self.failures += 1;
        if self.failures < policy.consecutive_failures.max(1) {
            return Ejected::No;
        }
        self.failures = 0;
        if others == 0 {
            return Ejected::KeptAsLast;
        }
        let factor = 1u32 << self.ejections.min(16);
        let span = policy.base.saturating_mul(factor).min(policy.max);
        self.ejections += 1;
        self.until = Some(now + span);
        Ejected::For(span)
    }
}

/// A token bucket: `rate` requests per second, bursts of `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: None,
        }
    }

    /// Takes a token at `now`; when there is none, how long until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if let Some(at) = self.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.rate.max(1e-9),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: Option<&str>, headers: &[(&str, &str)]) -> Route {
        Route {
            matches: RouteMatch {
                path_prefix: prefix.map(String::from),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            },
            ..Route::fallback()
        }
    }

    #[test]
    fn a_prefix_matches_on_segment_boundaries_and_headers_exactly() {
        let r = route(Some("/api"), &[]);
        assert!(r.takes("/api", &[]));
        assert!(r.takes("/api/v1", &[]));
        assert!(!r.takes("/apix", &[]), "not a segment boundary");
        assert!(!r.takes("/", &[]));
        assert!(route(Some("/api/"), &[]).takes("/api/x", &[]));
        assert!(route(Some("/"), &[]).takes("/anything", &[]));
        let h = route(None, &[("x-canary", "1")]);
        assert!(h.takes("/x", &[("X-Canary", " 1 ")]));
        assert!(!h.takes("/x", &[("x-canary", "2")]));
        assert!(!h.takes("/x", &[]));
        let routes = [h.clone(), route(Some("/api"), &[])];
        assert_eq!(
            select(&routes, "/api", &[("x-canary", "1")]),
            Some(&routes[0]),
            "first match wins"
        );
        assert_eq!(select(&routes, "/api", &[]), Some(&routes[1]));
        assert_eq!(select(&routes, "/other", &[]), None);
    }

    #[test]
    fn a_split_shares_requests_by_weight() {
        let split = |w: &[(&str, u32)]| Route {
            split: w
                .iter()
                .map(|(v, weight)| Split {
                    labels: [("version".to_string(), v.to_string())].into(),
                    weight: *weight,
                })
                .collect(),
            ..Route::fallback()
        };
        let r = split(&[("v1", 90), ("v2", 10)]);
        let n = 100_000u64;
        let v2 = (0..n)
            .map(|i| (i * (u64::from(u32::MAX) / n)) as u32)
            .filter(|roll| r.subset(*roll).unwrap().labels["version"] == "v2")
            .count();
        assert!((9_900..=10_100).contains(&v2), "{v2}");
        assert_eq!(r.subset(0).unwrap().labels["version"], "v1");
        assert_eq!(r.subset(u32::MAX).unwrap().labels["version"], "v2");
        assert!(
            split(&[("v1", 0)]).subset(5).is_none(),
            "no weight: every instance"
        );
        assert!(Route::fallback().subset(5).is_none());
    }

    #[test]
    fn only_safe_failures_are_retried() {
        let r = Route::fallback();
        assert!(r.retryable("GET", 503, None));
        assert!(
            !r.retryable("POST", 503, None),
            "a POST may have had its effect"
        );
        assert!(!r.retryable("GET", 500, None), "not listed");
        assert!(!r.retryable("GET", 200, None));
        assert!(
            r.retryable("POST", 200, Some(GRPC_UNAVAILABLE)),
            "gRPC: by status"
        );
        assert!(!r.retryable("POST", 200, Some(13)));
    }

    #[test]
    fn the_budget_holds_retries_to_a_share_of_requests() {
        let t0 = Instant::now();
        let mut b = Budget::new(0.2, 2, Duration::from_secs(10));
        for _ in 0..100 {
            b.request(t0);
        }
        let granted = (0..100).filter(|_| b.withdraw(t0)).count();
        assert_eq!(granted, 22, "20% of 100, plus the floor of 2");
        // The window after still counts the last one; two windows on, all is forgotten.
        assert!(!b.withdraw(t0 + Duration::from_secs(11)));
        assert!(b.withdraw(t0 + Duration::from_secs(25)), "the floor again");
    }

    #[test]
    fn an_outlier_is_ejected_for_growing_spans_but_never_the_last() {
        let p = EjectionPolicy {
            consecutive_failures: 3,
            base: Duration::from_secs(10),
            max: Duration::from_secs(25),
        };
        let t = Instant::now();
        let mut o = Outlier::default();
        assert_eq!(o.record(false, &p, 1, t), Ejected::No);
        assert_eq!(
            o.record(true, &p, 1, t),
            Ejected::No,
            "a success resets the count"
        );
        assert_eq!(o.record(false, &p, 1, t), Ejected::No);
        assert_eq!(o.record(false, &p, 1, t), Ejected::No);
        assert_eq!(
            o.record(false, &p, 1, t),
            Ejected::For(Duration::from_secs(10))
        );
        assert!(o.ejected(t + Duration::from_secs(9)));
        assert!(!o.ejected(t + Duration::from_secs(10)));
        let t2 = t + Duration::from_secs(10);
        for _ in 0..2 {
            o.record(false, &p, 1, t2);
        }
        assert_eq!(
            o.record(false, &p, 1, t2),
            Ejected::For(Duration::from_secs(20)),
            "doubled"
        );
        let t3 = t2 + Duration::from_secs(20);
        for _ in 0..2 {
            o.record(false, &p, 1, t3);
        }
        assert_eq!(
            o.record(false, &p, 1, t3),
            Ejected::For(Duration::from_secs(25)),
            "capped"
        );
        let mut last = Outlier::default();
        for _ in 0..2 {
            last.record(false, &p, 0, t);
        }
        assert_eq!(last.record(false, &p, 0, t), Ejected::KeptAsLast);
        assert!(!last.ejected(t));
    }

    #[test]
    fn a_bucket_allows_its_rate_and_says_when_to_come_back() {
        let t = Instant::now();
        let mut b = Bucket::new(10.0, 10.0);
        assert_eq!(
            (0..10).filter(|_| b.take(t).is_ok()).count(),
            10,
            "the burst"
        );
        let wait = b.take(t).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(b.take(t + Duration::from_millis(100)).is_ok());
        // Over a second, the rate.
        let mut b = Bucket::new(10.0, 1.0);
        let ok = (0..1000)
            .filter(|i| b.take(t + Duration::from_millis(*i)).is_ok())
            .count();
        assert!((10..=11).contains(&ok), "{ok}");
    }
}
