//! The HTTP keys of the node config: routes, retries, timeouts, ejection and faults of an
//! `http` upstream, and the rate limits of an `http` service. Every bad value names its
//! key.

use std::collections::BTreeMap;
use std::time::Duration;

use quicmesh_protocol::http::normalize_path;
use quicmesh_protocol::http_route::{EjectionPolicy, Fault, Route, RouteMatch, Split};
use quicmesh_protocol::ident::{LabelKey, ServiceName};
use serde::Deserialize;

use super::ConfigError;

type Err<'a> = &'a dyn Fn(&str, String) -> ConfigError;

/// Most routes an upstream may have.
pub const MAX_ROUTES: usize = 64;
/// Most retries a route may ask for.
pub const MAX_RETRIES: i64 = 10;

/// What an `http` upstream does with requests.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HttpUpstream {
    /// In order; the first that takes a request carries it. The last is the upstream's
    /// own (`default`), which takes every request.
    pub routes: Vec<Route>,
    /// Retries may add at most this share of requests (over 10 s, plus 10 a window).
    pub retry_budget: f64,
    /// `None`: instances are never ejected.
    pub ejection: Option<EjectionPolicy>,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        Self {
            routes: vec![Route::fallback()],
            retry_budget: 0.2,
            ejection: Some(EjectionPolicy::default()),
        }
    }
}

/// The route keys (on `[[upstream]]` they set the `default` route and what every
/// `[[upstream.route]]` starts from).
#[derive(Default, Clone)]
pub(super) struct RawRouteKeys {
    pub(super) timeout: Option<String>,
    pub(super) per_try_timeout: Option<String>,
    pub(super) retries: Option<i64>,
    pub(super) retry_on: Option<Vec<i64>>,
    pub(super) retry_grpc: Option<Vec<toml::Value>>,
    pub(super) fault: Option<RawFault>,
}

impl RawRouteKeys {
    fn is_empty(&self) -> bool {
        self.timeout.is_none()
            && self.per_try_timeout.is_none()
            && self.retries.is_none()
            && self.retry_on.is_none()
            && self.retry_grpc.is_none()
            && self.fault.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    name: Option<String>,
    path_prefix: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    split: Vec<RawSplit>,
    timeout: Option<String>,
    per_try_timeout: Option<String>,
    retries: Option<i64>,
    retry_on: Option<Vec<i64>>,
    retry_grpc: Option<Vec<toml::Value>>,
    fault: Option<RawFault>,
}

impl RawRoute {
    fn keys(&self) -> RawRouteKeys {
        RawRouteKeys {
            timeout: self.timeout.clone(),
            per_try_timeout: self.per_try_timeout.clone(),
            retries: self.retries,
            retry_on: self.retry_on.clone(),
            retry_grpc: self.retry_grpc.clone(),
            fault: self.fault.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    weight: Option<i64>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFault {
    delay: Option<String>,
    delay_percent: Option<f64>,
    abort: Option<i64>,
    abort_percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEjection {
    enabled: Option<bool>,
    consecutive_failures: Option<i64>,
    base: Option<String>,
    max: Option<String>,
}

/// An `[[upstream]]`'s HTTP keys, as written.
#[derive(Default)]
pub(super) struct RawHttpUpstream {
    pub(super) route: Vec<RawRoute>,
    pub(super) retry_budget: Option<f64>,
    pub(super) ejection: Option<RawEjection>,
    pub(super) keys: RawRouteKeys,
}

impl RawHttpUpstream {
    /// Whether any HTTP key was written (they need `protocol = "http"`).
    pub(super) fn written(&self) -> Option<&'static str> {
        if !self.route.is_empty() {
            Some("route")
        } else if self.retry_budget.is_some() {
            Some("retry_budget")
        } else if self.ejection.is_some() {
            Some("ejection")
        } else if !self.keys.is_empty() {
            Some("timeout")
        } else {
            None
        }
    }
}

fn duration(key: &str, v: &str, err: Err<'_>) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v)
        .map_err(|e| err(key, format!("{v:?} is not a duration: {e}")))?;
    if d.is_zero() {
        return Err(err(key, "must be longer than zero".into()));
    }
    Ok(d)
}

fn percent(key: &str, v: f64, err: Err<'_>) -> Result<f64, ConfigError> {
    if !(0.0..=100.0).contains(&v) {
        return Err(err(key, format!("{v} is not a percentage (0 to 100)")));
    }
    Ok(v)
}

/// A gRPC status by name (`"unavailable"`, `"resource-exhausted"`) or number.
fn grpc_status(v: &toml::Value) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid-argument",
        "deadline-exceeded",
        "not-found",
        "already-exists",
        "permission-denied",
        "resource-exhausted",
        "failed-precondition",
        "aborted",
        "out-of-range",
        "unimplemented",
        "internal",
        "unavailable",
        "data-loss",
        "unauthenticated",
    ];
    match v {
        toml::Value::Integer(n) => u32::try_from(*n).ok().filter(|n| *n <= 16),
        toml::Value::String(s) => {
            let s = s.to_ascii_lowercase().replace('_', "-");
            NAMES.iter().position(|n| *n == s).map(|i| i as u32)
        }
        _ => None,
    }
}

/// Applies route keys written at `key` over `base`.
fn apply_keys(
    base: &mut Route,
    keys: &RawRouteKeys,
    key: &str,
    err: Err<'_>,
) -> Result<(), ConfigError> {
    let k = |f: &str| format!("{key}.{f}");
    if let Some(t) = &keys.timeout {
        base.timeout = duration(&k("timeout"), t, err)?;
    }
    if let Some(t) = &keys.per_try_timeout {
        base.per_try_timeout = Some(duration(&k("per_try_timeout"), t, err)?);
    }
    if let Some(r) = keys.retries {
        if !(0..=MAX_RETRIES).contains(&r) {
            return Err(err(&k("retries"), format!("{r} is not 0 to {MAX_RETRIES}")));
        }
        base.retries = r as u32;
    }
    if let Some(list) = &keys.retry_on {
        base.retry_on = list
            .iter()
            .map(|s| {
                u16::try_from(*s)
                    .ok()
                    .filter(|s| (500..=599).contains(s))
                    .ok_or_else(|| err(&k("retry_on"), format!("{s} is not a 5xx status")))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(list) = &keys.retry_grpc {
        base.retry_grpc = list
            .iter()
            .map(|v| {
                grpc_status(v).ok_or_else(|| {
                    err(
                        &k("retry_grpc"),
                        format!(
                            "{v:?} is not a gRPC status (a name like \"unavailable\" or 0 to 16)"
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(f) = &keys.fault {
        let fk = |x: &str| k(&format!("fault.{x}"));
        let delay = f
            .delay
            .as_deref()
            .map(|d| duration(&fk("delay"), d, err))
            .transpose()?;
        let abort = f
            .abort
            .map(|a| {
                u16::try_from(a)
                    .ok()
                    .filter(|a| (400..=599).contains(a))
                    .ok_or_else(|| err(&fk("abort"), format!("{a} is not a 4xx or 5xx status")))
            })
            .transpose()?;
        let delay_percent = percent(
            &fk("delay_percent"),
            f.delay_percent
                .unwrap_or(if delay.is_some() { 100.0 } else { 0.0 }),
            err,
        )?;
        let abort_percent = percent(
            &fk("abort_percent"),
            f.abort_percent
                .unwrap_or(if abort.is_some() { 100.0 } else { 0.0 }),
            err,
        )?;
        if delay.is_none() && abort.is_none() {
            return Err(err(
                &k("fault"),
                "names neither a delay nor an abort".into(),
            ));
        }
        base.fault = Some(Fault {
            delay: delay.unwrap_or_default(),
            delay_percent,
            abort_status: abort.unwrap_or(503),
            abort_percent: if abort.is_some() { abort_percent } else { 0.0 },
        });
    }
    // A per-try timeout written here may not outlast the timeout (an inherited one is
    // simply cut short by a route's shorter timeout).
    if keys.per_try_timeout.is_some() && base.per_try_timeout.is_some_and(|p| p > base.timeout) {
        return Err(err(
            &k("per_try_timeout"),
            format!("is longer than the timeout ({:?})", base.timeout),
        ));
    }
    Ok(())
}

/// Checks an `http` upstream's keys written at `key` (`upstream[0]`).
pub(super) fn upstream(
    raw: RawHttpUpstream,
    key: &str,
    err: Err<'_>,
) -> Result<HttpUpstream, ConfigError> {
    let k = |f: &str| format!("{key}.{f}");
    let mut base = Route::fallback();
    apply_keys(&mut base, &raw.keys, key, err)?;
    if raw.route.len() > MAX_ROUTES {
        return Err(err(
            &k("route"),
            format!("{} routes (at most {MAX_ROUTES})", raw.route.len()),
        ));
    }
    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.route.into_iter().enumerate() {
        let rk = format!("{key}.route[{i}]");
        let f = |x: &str| format!("{rk}.{x}");
        let keys = r.keys();
        let name = r.name.ok_or_else(|| err(&f("name"), "missing".into()))?;
        let good = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !good || name == "default" {
            return Err(err(&f("name"), format!("{name:?} is not a route name (lower-case letters, digits, '-'; not \"default\")")));
        }
        if routes.iter().any(|o| o.name == name) {
            return Err(err(&f("name"), format!("route {name} is listed twice")));
        }
        let path_prefix = match r.path_prefix {
            None => None,
            Some(p) => {
                let n = normalize_path(&p)
                    .map_err(|e| err(&f("path_prefix"), format!("{p:?}: {e}")))?;
                if !p.starts_with('/') || n != p {
                    return Err(err(
                        &f("path_prefix"),
                        format!("{p:?} is not a normalised path (it would be {n:?})"),
                    ));
                }
                Some(p)
            }
        };
        let mut headers = Vec::new();
        for (n, v) in r.headers {
            if n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(
                    &f(&format!("headers.{n}")),
                    "is not a header name".into(),
                ));
            }
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut split = Vec::new();
        for (j, s) in r.split.into_iter().enumerate() {
            let sk = |x: &str| f(&format!("split[{j}].{x}"));
            let weight = s
                .weight
                .ok_or_else(|| err(&sk("weight"), "missing".into()))?;
            if !(0..=1_000_000).contains(&weight) {
                return Err(err(&sk("weight"), format!("{weight} is not 0 to 1000000")));
            }
            if s.labels.is_empty() {
                return Err(err(
                    &sk("labels"),
                    "missing: a subset names the labels its instances carry".into(),
                ));
            }
            for l in s.labels.keys() {
                LabelKey::new(l).map_err(|e| err(&sk(&format!("labels.{l}")), e.to_string()))?;
            }
            split.push(Split {
                labels: s.labels,
                weight: weight as u32,
            });
        }
        if !split.is_empty() && split.iter().all(|s| s.weight == 0) {
            return Err(err(&f("split"), "every weight is zero".into()));
        }
        let mut route = Route {
            name,
            matches: RouteMatch {
                path_prefix,
                headers,
            },
            split,
            ..base.clone()
        };
        apply_keys(&mut route, &keys, &rk, err)?;
        routes.push(route);
    }
    routes.push(base);
    let retry_budget = raw.retry_budget.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&retry_budget) {
        return Err(err(
            &k("retry_budget"),
            format!("{retry_budget} is not a share (0 to 1)"),
        ));
    }
    let ejection = match raw.ejection {
        None => Some(EjectionPolicy::default()),
        Some(e) if e.enabled == Some(false) => None,
        Some(e) => {
            let ek = |x: &str| k(&format!("ejection.{x}"));
            let d = EjectionPolicy::default();
            let n = e
                .consecutive_failures
                .unwrap_or(i64::from(d.consecutive_failures));
            if !(1..=1000).contains(&n) {
                return Err(err(
                    &ek("consecutive_failures"),
                    format!("{n} is not 1 to 1000"),
                ));
            }
            let base = e
                .base
                .map(|b| duration(&ek("base"), &b, err))
                .transpose()?
                .unwrap_or(d.base);
            let max = e
                .max
                .map(|m| duration(&ek("max"), &m, err))
                .transpose()?
                .unwrap_or(d.max.max(base));
            if max < base {
                return Err(err(&ek("max"), "is shorter than the base".into()));
            }
            Some(EjectionPolicy {
                consecutive_failures: n as u32,
                base,
                max,
            })
        }
    };
    Ok(HttpUpstream {
        routes,
        retry_budget,
        ejection,
    })
}

/// A rate limit on an `http` service: requests per second from one source service (or
/// from each one not named, `"*"`), with bursts of one second's worth.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RateLimit {
    /// `None`: every source service not named by another limit.
    pub source: Option<ServiceName>,
    pub per_second: f64,
}

/// Checks `rate_limit = { web = 100, "*" = 1000 }` at `key`.
pub(super) fn rate_limits(
    raw: BTreeMap<String, f64>,
    key: &str,
    err: Err<'_>,
) -> Result<Vec<RateLimit>, ConfigError> {
    let mut out = Vec::new();
    for (src, rate) in raw {
        let k = format!("{key}.{src}");
        if !(rate.is_finite() && rate > 0.0 && rate <= 1e7) {
            return Err(err(
                &k,
                format!("{rate} is not a rate (requests per second, above zero)"),
            ));
        }
        let source = if src == "*" {
            None
        } else {
            Some(ServiceName::new(src).map_err(|e| err(&k, e.to_string()))?)
        };
        out.push(RateLimit {
            source,
            per_second: rate,
        });
    }
    Ok(out)
}
