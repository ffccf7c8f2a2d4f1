//! HTTP traffic management end to end on loopback: real coordinator and node processes,
//! real HTTP services (hyper) labelled `version = v1` and `v2`, and a real HTTP client
//! (hyper's pooled client) through an `http` upstream with routes.

use std::time::{Duration, Instant};

use anyhow::ensure;
use quicmesh_netns_tests::http::{HttpService, Load};
use quicmesh_netns_tests::net::{echo_server, metric};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "api"
action = "allow"
"#;

struct Mesh2 {
    _mesh: Mesh,
    _coord: CoordinatorProc,
    _api: Vec<NodeProc>,
    web: NodeProc,
    v1: HttpService,
    v2: HttpService,
}

/// api-1 (v1, `v1_service`) and api-2 (v2) host `api`; web-1 reaches it through an
/// `http` upstream configured by `upstream` lines; `service` lines go on both `api`s.
fn mesh(test: &str, v1: HttpService, upstream: &[&str], service: &[&str]) -> Mesh2 {
    let mesh = Mesh::new(test);
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let out = coord.apply_policy(&mesh, POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = HttpService::start("api-2").unwrap();
    let mut lines = vec!["protocol = \"http\""];
    lines.extend_from_slice(service);
    let api: Vec<NodeProc> = [("api-1", &v1, "v1"), ("api-2", &v2, "v2")]
        .into_iter()
        .map(|(name, svc, version)| {
            NodeProc::start(
                &mesh,
                &coord,
                &NodeSpec::new(name)
                    .label("version", version)
                    .service_with("api", svc.addr, &lines),
            )
            .unwrap()
        })
        .collect();
    let mut up = vec!["protocol = \"http\""];
    up.extend_from_slice(upstream);
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream_with("api", &up),
    )
    .unwrap();
    coord.wait_all_acked(3, Duration::from_secs(15));
    Mesh2 {
        _mesh: mesh,
        _coord: coord,
        _api: api,
        web,
        v1,
        v2,
    }
}

const ROUTES: &[&str] = &[
    "retries = 3",
    "per_try_timeout = \"2s\"",
    "[[upstream.route]]",
    "name = \"canary\"",
    "headers = { x-canary = \"1\" }",
    "split = [{ labels = { version = \"v2\" }, weight = 1 }]",
    "[[upstream.route]]",
    "name = \"slow\"",
    "path_prefix = \"/sleep\"",
    "timeout = \"500ms\"",
    "[[upstream.route]]",
    "name = \"chaos\"",
    "path_prefix = \"/chaos\"",
    "fault = { abort = 503, abort_percent = 50 }",
    "[[upstream.route]]",
    "name = \"split\"",
    "path_prefix = \"/split\"",
    "split = [{ labels = { version = \"v1\" }, weight = 90 }, { labels = { version = \"v2\" }, weight = 10 }]",
];

fn count<T>(v: &[anyhow::Result<T>], f: impl Fn(&T) -> bool) -> usize {
    v.iter().filter(|r| r.as_ref().is_ok_and(&f)).count()
}

fn seen(s: &HttpService, path: &str) -> usize {
    s.seen().iter().filter(|p| p.as_str() == path).count()
}

#[test]
fn splits_header_routes_retries_timeouts_and_faults() -> anyhow::Result<()> {
    let m = mesh("l7_routes", HttpService::start_flaky("api-1")?, ROUTES, &[]);
    let url = |p: &str| format!("http://{}{p}", m.web.upstream_at(0));
    let load = Load::new();

    // A 90/10 split over 2,000 requests.
    let r = load.send("GET", &url("/split"), &[], 2000, 8);
    let v2 = count(&r, |a| a.status == 200 && a.body.starts_with("api-2 "));
    let ok = count(&r, |a| a.status == 200);
    let bad: Vec<String> = r
        .iter()
        .filter(|a| !a.as_ref().is_ok_and(|a| a.status == 200))
        .map(|a| format!("{a:?}"))
        .collect();
    ensure!(ok == 2000, "every split request answered: {ok}: {bad:?}");
    let share = v2 as f64 / 20.0;
    println!("split: {v2} of 2000 to v2 ({share:.1} %)");
    ensure!(
        (7.0..=13.0).contains(&share),
        "10 % ± 3 to v2: {share:.1} %"
    );

    // A header route sends to v2 only; its denied twin (no header) reaches both.
    let r = load.send("GET", &url("/canary"), &[("x-canary", "1")], 200, 4);
    ensure!(
        count(&r, |a| a.body.starts_with("api-2 ")) == 200,
        "all to v2"
    );
    let r = load.send("GET", &url("/canary"), &[("x-canary", "0")], 200, 4);
    ensure!(
        count(&r, |a| a.body.starts_with("api-1 ")) > 20,
        "the default route spreads"
    );

    // Retries hide an instance answering 503 to 20 % of its requests.
    let r = load.send("GET", &url("/flaky"), &[], 2000, 8);
    let ok = count(&r, |a| a.status == 200);
    println!("retried GETs: {ok} of 2000 succeeded");
    ensure!(ok >= 1998, "≥ 99.9 % success with retries: {ok}");
    let retried = metric(
        &m.web.metrics()?,
        "quicmesh_http_retries_total",
        &[("dst_service", "api")],
    );
    ensure!(retried > 50.0, "the 503s were retried: {retried}");
    // POSTs are not: each reaches one instance once, and some fail.
    let before = seen(&m.v1, "/flaky") + seen(&m.v2, "/flaky");
    let r = load.send("POST", &url("/flaky"), &[], 500, 8);
    let after = seen(&m.v1, "/flaky") + seen(&m.v2, "/flaky");
    let failed = count(&r, |a| a.status == 503);
    println!("POSTs: {failed} of 500 answered 503, not retried");
    ensure!(
        after - before == 500,
        "each POST sent once: {}",
        after - before
    );
    ensure!(
        failed > 0,
        "the flaky instance's 503s reach the client for POSTs"
    );

    // A hung instance becomes a 504 within the route's timeout.
    let r = load.send("GET", &url("/sleep/5000"), &[], 4, 4);
    for a in &r {
        let a = a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(
            a.status == 504 && a.reason.as_deref() == Some("timeout"),
            "{a:?}"
        );
        ensure!(
            a.elapsed < Duration::from_millis(1500),
            "within the 500 ms bound: {:?}",
            a.elapsed
        );
    }

    // Fault injection: half the requests aborted, counted by reason.
    let r = load.send("GET", &url("/chaos"), &[], 400, 8);
    let aborted = count(&r, |a| {
        a.status == 503 && a.reason.as_deref() == Some("fault_injected")
    });
    let ok = count(&r, |a| a.status == 200);
    println!("faults: {aborted} of 400 aborted");
    ensure!(
        (140..=260).contains(&aborted) && aborted + ok == 400,
        "{aborted} aborted, {ok} ok"
    );

    // The coordinator's dashboard API shows how web-1 routes, as its TOML sets it.
    let routes = m._coord.api_get("traffic")?["http_routes"].clone();
    let find = |name: &str| {
        routes
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["node"] == "web-1" && r["route"] == name)
            .cloned()
    };
    let split = find("split").ok_or_else(|| anyhow::anyhow!("no split route: {routes}"))?;
    ensure!(
        split["src"] == "web" && split["dst"] == "api" && split["path_prefix"] == "/split",
        "{split}"
    );
    ensure!(
        split["split"][1]["labels"]["version"] == "v2" && split["split"][1]["weight"] == 10,
        "{split}"
    );
    let chaos = find("chaos").ok_or_else(|| anyhow::anyhow!("no chaos route: {routes}"))?;
    ensure!(
        chaos["fault"]
            .as_str()
            .is_some_and(|f| f.contains("abort 503 on 50%")),
        "{chaos}"
    );
    ensure!(
        find("default").is_some_and(|d| d["retries"] == 3),
        "{routes}"
    );
    Ok(())
}

#[test]
fn a_failing_instance_is_ejected_then_brought_back_and_the_last_is_kept() -> anyhow::Result<()> {
    let lines = &[
        "retries = 2",
        "ejection = { consecutive_failures = 3, base = \"2s\", max = \"10s\" }",
    ];
    let m = mesh("l7_ejection", HttpService::start("api-1")?, lines, &[]);
    let url = format!("http://{}/e", m.web.upstream_at(0));
    let load = Load::new();
    m.v2.set_failing(true);
    let r = load.send("GET", &url, &[], 200, 1);
    ensure!(
        count(&r, |a| a.status == 200) == 200,
        "retries hide the failures meanwhile"
    );
    let hits = seen(&m.v2, "/e");
    println!("failing instance saw {hits} of 200 requests before and while ejected");
    ensure!(hits <= 4, "ejected after 3 failures: it saw {hits}");
    let metrics = m.web.metrics()?;
    ensure!(
        metric(
            &metrics,
            "quicmesh_http_ejections_total",
            &[("kept", "false")]
        ) >= 1.0
    );
    // It recovers; after the ejection it is tried again and serves.
    m.v2.set_failing(false);
    std::thread::sleep(Duration::from_millis(2500));
    let before = seen(&m.v2, "/e");
    let r = load.send("GET", &url, &[], 200, 2);
    ensure!(count(&r, |a| a.status == 200) == 200);
    let back = seen(&m.v2, "/e") - before;
    println!("recovered instance served {back} of 200");
    ensure!(back > 20, "brought back: {back}");
    // Both failing: the last one in service is never ejected (its answers pass through).
    std::thread::sleep(Duration::from_millis(100));
    m.v1.set_failing(true);
    m.v2.set_failing(true);
    let r = load.send("GET", &url, &[], 40, 1);
    ensure!(
        count(&r, |a| a.status == 503 && a.reason.is_none()) == 40,
        "the service's own 503s"
    );
    let metrics = m.web.metrics()?;
    ensure!(
        metric(
            &metrics,
            "quicmesh_http_ejections_total",
            &[("kept", "true")]
        ) >= 1.0,
        "kept as the last one"
    );
    Ok(())
}

#[test]
fn a_rate_limit_answers_429_at_its_rate() -> anyhow::Result<()> {
    let m = mesh(
        "l7_rate_limit",
        HttpService::start("api-1")?,
        &[],
        &["rate_limit = { web = 25 }"],
    );
    let url = format!("http://{}/r", m.web.upstream_at(0));
    let load = Load::new();
    let started = Instant::now();
    let mut all = Vec::new();
    while started.elapsed() < Duration::from_secs(4) {
        all.extend(load.send("GET", &url, &[], 20, 4));
    }
    let secs = started.elapsed().as_secs_f64();
    let ok = count(&all, |a| a.status == 200);
    let limited = count(&all, |a| {
        a.status == 429 && a.reason.as_deref() == Some("rate_limited")
    });
    // Two instances, each limiting web to 25/s with a burst of 25.
    let expected = 2.0 * (25.0 + 25.0 * secs);
    println!("rate limit: {ok} allowed, {limited} refused in {secs:.2} s (expected {expected:.0})");
    ensure!(
        ok + limited == all.len(),
        "every request allowed or limited"
    );
    ensure!(
        (ok as f64 - expected).abs() <= expected * 0.1,
        "{ok} allowed, expected {expected:.0} ± 10 %"
    );
    let r = all
        .iter()
        .flatten()
        .find(|a| a.status == 429)
        .expect("a 429");
    ensure!(r.retry_after.as_deref() == Some("1"), "Retry-After: {r:?}");
    Ok(())
}
