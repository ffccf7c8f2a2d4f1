//! The coordinator's dashboard: driven end to end in headless Chromium against a
//! coordinator with three nodes, and its API's refusals checked with raw requests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use quicmesh_netns_tests::browser::{connect_from, http, http_from, Browser};
use quicmesh_netns_tests::net::echo_server;
use quicmesh_netns_tests::{assert_eventually, CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "api"
action = "allow"

[[test]]
from = "web"
to = "api"
expect = "allow"
"#;

/// Its test says batch may reach api, but no rule allows it: refused whole.
const BAD_POLICY: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "api"
action = "allow"

[[test]]
from = "batch"
to = "api"
expect = "allow"
"#;

const GOOD_POLICY: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "api"
action = "allow"

[[rule]]
from = "web"
to = "batch"
action = "allow"

[[test]]
from = "batch"
to = "api"
expect = "deny"
"#;

fn api_addr(c: &CoordinatorProc) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], c.http_port))
}

fn js_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[test]
fn d1_dashboard_end_to_end_in_headless_chromium() {
    let mesh = Mesh::new("d1");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    assert!(coord.apply_policy(&mesh, POLICY).unwrap().status.success());
    let api_echo = echo_server().unwrap();
    let batch_echo = echo_server().unwrap();
    let web_echo = echo_server().unwrap();
    let api1 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("api-1").service("api", api_echo),
    )
    .unwrap();
    let web1 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", web_echo)
            .upstream("api"),
    )
    .unwrap();
    let batch1 = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("batch-1")
            .service("batch", batch_echo)
            .upstream("api"),
    )
    .unwrap();
    coord.wait_all_acked(3, Duration::from_secs(20));
    let base = format!("http://127.0.0.1:{}", coord.http_port);
    // Kept after the test (the mesh dir is not): what each page looked like.
    let shots = std::env::temp_dir().join("quicmesh-dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut b = Browser::launch().unwrap_or_else(|e| panic!("{e:#}"));

    // 1. Sign in: an unauthenticated page sends the browser to the sign-in page.
    b.goto(&format!("{base}/ui/overview")).unwrap();
    assert_eq!(b.eval("location.pathname").unwrap(), "/ui/login");
    b.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('signin').click(); true",
        js_str(&coord.admin_token)
    ))
    .unwrap();
    b.wait(
        "signed in, overview shown",
        "location.pathname === '/ui/overview' && document.body.dataset.ready === '1'",
        Duration::from_secs(10),
    )
    .unwrap();
    b.wait(
        "three nodes online",
        "document.getElementById('nodes-online').textContent === '3'",
        Duration::from_secs(10),
    )
    .unwrap();
    // The coordinator lists itself as the one replica, alive, holding the three sessions
    // (once its heartbeat, written every second, has counted them: then the page is
    // loaded again).
    assert_eventually(
        "the heartbeat counts three sessions",
        Duration::from_secs(10),
        || {
            let v = coord.api_get("replicas")?;
            anyhow::ensure!(v["replicas"][0]["sessions"] == 3, "{v}");
            Ok(())
        },
    );
    b.goto(&format!("{base}/ui/overview")).unwrap();
    b.wait(
        "the replicas table shows this coordinator alive with three sessions",
        "(() => { const rows = document.querySelectorAll('#replicas tr[data-replica]');
                  return rows.length === 1 && rows[0].textContent.includes('(this one)')
                    && rows[0].textContent.includes('alive') && rows[0].children[3].textContent === '3'; })()",
        Duration::from_secs(10),
    )
    .unwrap();
    // Page weight: the document and everything it loaded, as transferred.
    let weight = b
        .eval(
            "(() => { const n = performance.getEntriesByType('navigation')[0];
                      const r = performance.getEntriesByType('resource');
                      return { document: n.transferSize, resources: r.map(e => [e.name.replace(location.origin, ''), e.transferSize]),
                               total: n.transferSize + r.reduce((a, e) => a + e.transferSize, 0) }; })()",
        )
        .unwrap();
    println!("overview page weight: {weight}");
    b.screenshot(&shots.join("overview.png")).unwrap();

    // 2. The three nodes and their services.
    b.goto(&format!("{base}/ui/nodes")).unwrap();
    for n in ["api-1", "web-1", "batch-1"] {
        b.wait(
            &format!("node {n} listed"),
            &format!("document.querySelector('#nodes tr[data-node=\"{n}\"]')"),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    // Each node's control session shows the key exchange it negotiated (the hybrid).
    b.wait(
        "web-1's control session key exchange shown",
        "document.querySelector('#nodes tr[data-node=\"web-1\"]').textContent.includes('X25519MLKEM768')",
        Duration::from_secs(5),
    )
    .unwrap();
    b.screenshot(&shots.join("nodes.png")).unwrap();
    b.goto(&format!("{base}/ui/services")).unwrap();
    for (svc, node) in [("api", "api-1"), ("web", "web-1"), ("batch", "batch-1")] {
        b.wait(
            &format!("{svc} on {node}"),
            &format!("document.querySelector('#services tr[data-service=\"{svc}\"][data-node=\"{node}\"]')"),
            Duration::from_secs(5),
        )
        .unwrap();
    }
    b.screenshot(&shots.join("services.png")).unwrap();

    // 3. A policy whose test fails: the failure is shown, nothing changes.
    let admin = format!("Bearer {}", coord.admin_token);
    let version = |c: &CoordinatorProc| {
        http(
            api_addr(c),
            "GET",
            "/api/v1/policy",
            &[("Authorization", &admin)],
            None,
        )
        .unwrap()
        .json()["version"]
            .as_u64()
            .unwrap()
    };
    let v1 = version(&coord);
    b.goto(&format!("{base}/ui/policy")).unwrap();
    b.eval(&format!(
        "document.getElementById('policy-source').value = {}; document.getElementById('policy-apply').click(); true",
        js_str(BAD_POLICY)
    ))
    .unwrap();
    b.wait(
        "the failing test is shown",
        "document.getElementById('policy-error') && document.querySelectorAll('#policy-failures li').length > 0",
        Duration::from_secs(5),
    )
    .unwrap();
    let shown = b
        .eval("document.getElementById('policy-result').innerText")
        .unwrap();
    println!("bad policy: {shown}");
    assert!(shown.as_str().unwrap().contains("batch"), "{shown}");
    b.screenshot(&shots.join("policy-failed.png")).unwrap();
    assert_eq!(
        version(&coord),
        v1,
        "a policy with a failing test changes nothing"
    );

    // 4. A good policy applies.
    b.eval(&format!(
        "document.getElementById('policy-source').value = {}; document.getElementById('policy-apply').click(); true",
        js_str(GOOD_POLICY)
    ))
    .unwrap();
    b.wait(
        "applied",
        "document.getElementById('policy-ok')",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(version(&coord), v1 + 1);
    b.wait(
        "the page follows the new version live",
        &format!(
            "document.getElementById('policy-current').textContent === 'version {}'",
            v1 + 1
        ),
        Duration::from_secs(5),
    )
    .unwrap();

    // 5. Allowed traffic shows flows and setup latency; a denied request raises the
    // traffic page's denial counter without a reload.
    let web_up = web1.upstream("api");
    for _ in 0..20 {
        let mut f = quicmesh_netns_tests::net::LiveFlow::open(web_up).unwrap();
        f.ping().unwrap();
    }
    b.goto(&format!("{base}/ui/traffic")).unwrap();
    b.wait(
        "web -> api flows with setup latency",
        "(() => { const r = document.querySelector('#traffic tr[data-pair=\"web->api\"]'); return r && Number(r.querySelector('td.flows').textContent) >= 20 && r.querySelector('td.p99').textContent.endsWith('ms'); })()",
        Duration::from_secs(10),
    )
    .unwrap();
    let denied = "(() => { const c = document.querySelector('#traffic tr[data-pair=\"batch->api\"] td.denied'); return c ? Number(c.textContent) : 0; })()";
    let before = b.eval(denied).unwrap().as_u64().unwrap_or(0);
    b.eval("window.__not_reloaded = true").unwrap();
    let up = batch1.upstream("api");
    let refused = std::net::TcpStream::connect(up).and_then(|mut s| {
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hello")?;
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    assert!(
        matches!(refused, Ok(0) | Err(_)),
        "batch -> api is denied: {refused:?}"
    );
    let took = b
        .wait(
            "the denial counter rises live",
            &format!("{denied} > {before} && window.__not_reloaded === true"),
            Duration::from_secs(10),
        )
        .unwrap();
    println!(
        "denial counter {before} -> {} after {:.1} s, no reload",
        b.eval(denied).unwrap(),
        took.as_secs_f64()
    );
    b.screenshot(&shots.join("traffic.png")).unwrap();
    b.goto(&format!("{base}/ui/topology")).unwrap();
    b.wait(
        "the topology draws the denied edge",
        "document.querySelector('#topology line.denied[data-edge=\"batch->api\"]')",
        Duration::from_secs(5),
    )
    .unwrap();
    // On loopback nothing is relayed through the coordinator: the page says so.
    b.wait(
        "the topology says which pairs the coordinator relays",
        "(document.querySelector('#relayed') || {}).textContent === 'None: every tunnel is direct or on a relay node.'",
        Duration::from_secs(5),
    )
    .unwrap();
    b.screenshot(&shots.join("topology.png")).unwrap();

    // 6. Revoke a node: asked to confirm, then gone from the mesh.
    b.goto(&format!("{base}/ui/nodes")).unwrap();
    b.eval("document.querySelector('button.revoke[data-node=\"batch-1\"]').click(); true")
        .unwrap();
    b.wait(
        "asked to confirm",
        "document.getElementById('confirm-yes')",
        Duration::from_secs(5),
    )
    .unwrap();
    b.screenshot(&shots.join("revoke-confirm.png")).unwrap();
    b.eval("document.getElementById('confirm-yes').click(); true")
        .unwrap();
    b.wait(
        "batch-1 gone from the nodes page",
        "!document.querySelector('#nodes tr[data-node=\"batch-1\"]') && document.querySelector('#nodes tr[data-node=\"web-1\"]')",
        Duration::from_secs(10),
    )
    .unwrap();
    let nodes = http(
        api_addr(&coord),
        "GET",
        "/api/v1/nodes",
        &[("Authorization", &admin)],
        None,
    )
    .unwrap()
    .json();
    let batch = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "batch-1")
        .unwrap()
        .clone();
    assert!(
        !batch["revoked_at"].is_null(),
        "revoked in the store: {batch}"
    );
    quicmesh_netns_tests::assert_eventually(
        "web-1 no longer has batch-1 as a peer",
        Duration::from_secs(10),
        || {
            let st = web1.status()?;
            let peers = st["peers"].as_array().cloned().unwrap_or_default();
            anyhow::ensure!(
                !peers.iter().any(|p| p["node"] == "batch-1"),
                "still a peer"
            );
            Ok(())
        },
    );
    // 7. WireGuard clients: the page lists none; adding one for a node that runs no
    // gateway is refused with the reason, and nothing is stored. (A client added through
    // a real gateway, its configuration and QR code, and its traffic in the list: the
    // netns WireGuard test.)
    b.goto(&format!("{base}/ui/clients")).unwrap();
    b.wait(
        "the clients page",
        "document.getElementById('wg-clients') && document.getElementById('wg-add')",
        Duration::from_secs(5),
    )
    .unwrap();
    b.eval(
        "for (const [id, v] of [['wg-name', 'alice-phone'], ['wg-service', 'laptop'], ['wg-labels', 'owner=alice'], ['wg-gateways', 'web-1']]) document.getElementById(id).value = v; document.querySelector('#wg-add button[type=submit]').click(); true",
    )
    .unwrap();
    b.wait(
        "the refusal, with its reason",
        "(document.getElementById('wg-error') || {}).textContent?.includes('web-1 has not reported a WireGuard gateway')",
        Duration::from_secs(5),
    )
    .unwrap();
    b.screenshot(&shots.join("wireguard-refused.png")).unwrap();
    let listed = http(
        api_addr(&coord),
        "GET",
        "/api/v1/wg",
        &[("Authorization", &admin)],
        None,
    )
    .unwrap()
    .json();
    assert_eq!(listed["clients"], serde_json::json!([]), "nothing stored");
    println!("screenshots in {}", shots.display());
    drop((b, api1, web1, batch1, coord, mesh));
}

/// Every API route, with a body where it takes one.
const ROUTES: [(&str, &str, Option<&str>); 17] = [
    ("GET", "/api/v1/status", None),
    ("GET", "/api/v1/wg", None),
    (
        "POST",
        "/api/v1/wg",
        Some(r#"{"name":"x","service":"laptop","gateways":["web-1"]}"#),
    ),
    ("POST", "/api/v1/wg/x/revoke", Some("{}")),
    ("GET", "/api/v1/nodes", None),
    ("POST", "/api/v1/nodes/web-1/revoke", Some("{}")),
    ("GET", "/api/v1/services", None),
    ("POST", "/api/v1/tokens", Some(r#"{"node":"x"}"#)),
    ("GET", "/api/v1/policy", None),
    (
        "POST",
        "/api/v1/policy",
        Some(r#"{"source":"default = \"deny\"\n","dry_run":true}"#),
    ),
    ("GET", "/api/v1/policy/history", None),
    ("GET", "/api/v1/policy/explain?from=web&to=api", None),
    ("GET", "/api/v1/traffic", None),
    ("GET", "/api/v1/topology", None),
    ("GET", "/api/v1/openapi.json", None),
    ("GET", "/api/v1/session", None),
    ("DELETE", "/api/v1/session", None),
];

#[test]
fn d2_every_route_and_page_refuses_strangers_csrf_and_read_only_changes() {
    let mesh = Mesh::new("d2");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let addr = api_addr(&coord);
    // No credential: every route 401 (the events stream too), every page to sign-in.
    for (m, p, body) in ROUTES.iter().chain([&("GET", "/api/v1/events", None)]) {
        let r = http(addr, m, p, &[], *body).unwrap();
        assert_eq!(r.status, 401, "{m} {p} without a credential: {}", r.body);
    }
    for (m, p, body) in ROUTES {
        let r = http(addr, m, p, &[("Authorization", "Bearer qma_wrong")], body).unwrap();
        assert_eq!(r.status, 401, "{m} {p} with a wrong token");
    }
    for page in [
        "overview", "nodes", "services", "policy", "traffic", "topology", "clients",
    ] {
        let r = http(addr, "GET", &format!("/ui/{page}"), &[], None).unwrap();
        assert_eq!(r.status, 303, "/ui/{page} without a session");
        assert_eq!(r.header("location"), Some("/ui/login"));
        assert!(
            !r.body.contains("data-nav"),
            "no page content without a session"
        );
        let r = http(
            addr,
            "GET",
            &format!("/ui/{page}"),
            &[("Cookie", "qm_session=forged")],
            None,
        )
        .unwrap();
        assert_eq!(r.status, 303, "/ui/{page} with a forged session");
    }
    // Its twin: the sign-in page and assets are public, and carry a strict CSP.
    let login = http(addr, "GET", "/ui/login", &[], None).unwrap();
    assert_eq!(login.status, 200);
    assert!(login
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'none'"));

    // A session: the cookie is HttpOnly and SameSite; a change without the CSRF token is
    // refused, with it accepted.
    let r = http(
        addr,
        "POST",
        "/api/v1/session",
        &[],
        Some(&format!("{{\"token\":\"{}\"}}", coord.admin_token)),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let set = r.header("set-cookie").unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = r.json()["csrf"].as_str().unwrap().to_string();
    let dry = r#"{"source":"default = \"deny\"\n","dry_run":true}"#;
    let r = http(
        addr,
        "POST",
        "/api/v1/policy",
        &[("Cookie", &cookie)],
        Some(dry),
    )
    .unwrap();
    assert_eq!(r.status, 403, "no CSRF token: {}", r.body);
    assert!(r.body.contains("CSRF"));
    let r = http(
        addr,
        "POST",
        "/api/v1/policy",
        &[("Cookie", &cookie), ("X-CSRF-Token", "0000")],
        Some(dry),
    )
    .unwrap();
    assert_eq!(r.status, 403, "wrong CSRF token");
    let r = http(
        addr,
        "POST",
        "/api/v1/policy",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        Some(dry),
    )
    .unwrap();
    assert_eq!(r.status, 200, "with the CSRF token: {}", r.body);
    let page = http(addr, "GET", "/ui/overview", &[("Cookie", &cookie)], None).unwrap();
    assert_eq!(page.status, 200, "a signed-in page");
    let r = http(
        addr,
        "DELETE",
        "/api/v1/session",
        &[("Cookie", &cookie)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 403, "sign-out needs the CSRF token too");
    let r = http(
        addr,
        "DELETE",
        "/api/v1/session",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let r = http(addr, "GET", "/api/v1/status", &[("Cookie", &cookie)], None).unwrap();
    assert_eq!(r.status, 401, "signed out");

    // The read-only token: reads everything, every change refused (bearer and session).
    let reader = std::fs::read_to_string(coord.data_dir.join("reader.token"))
        .unwrap()
        .trim()
        .to_string();
    let bearer = format!("Bearer {reader}");
    for (m, p, body) in ROUTES {
        let r = http(addr, m, p, &[("Authorization", &bearer)], body).unwrap();
        if m == "GET" {
            assert_eq!(r.status, 200, "reader {m} {p}: {}", r.body);
        } else if p != "/api/v1/session" {
            assert_eq!(r.status, 403, "reader {m} {p}: {}", r.body);
            assert!(r.body.contains("read-only"), "{}", r.body);
        }
    }
    let r = http(
        addr,
        "POST",
        "/api/v1/session",
        &[],
        Some(&format!("{{\"token\":\"{reader}\"}}")),
    )
    .unwrap();
    assert_eq!(r.json()["role"], "reader");
    let rc = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let rcsrf = r.json()["csrf"].as_str().unwrap().to_string();
    let r = http(
        addr,
        "POST",
        "/api/v1/policy",
        &[("Cookie", &rc), ("X-CSRF-Token", &rcsrf)],
        Some(dry),
    )
    .unwrap();
    assert_eq!(r.status, 403, "a read-only session changes nothing");

    // Sign-in attempts are limited per address.
    let mut codes = Vec::new();
    for _ in 0..7 {
        let r = http(
            addr,
            "POST",
            "/api/v1/session",
            &[],
            Some(r#"{"token":"qma_guess"}"#),
        )
        .unwrap();
        codes.push(r.status);
    }
    assert_eq!(&codes[..5], &[401; 5], "{codes:?}");
    assert_eq!(
        codes[5], 429,
        "the sixth failure in a minute is refused: {codes:?}"
    );
    let r = http(
        addr,
        "POST",
        "/api/v1/session",
        &[],
        Some(&format!("{{\"token\":\"{}\"}}", coord.admin_token)),
    )
    .unwrap();
    assert_eq!(r.status, 429, "even a right token waits out the limit");
    drop((coord, mesh));
}

/// An `/api/v1/events` stream held open from `from` (a long-lived request, as a dashboard
/// page holds), or the server's refusal.
fn hold_events(
    from: IpAddr,
    addr: SocketAddr,
    bearer: &str,
) -> Result<std::net::TcpStream, String> {
    use std::io::{Read, Write};
    let mut s = connect_from(Some(from), addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {bearer}\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut b = [0u8; 512];
    let n = s.read(&mut b).map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&b[..n]).to_string();
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(head)
    }
}

fn status(addr: SocketAddr, bearer: &str) -> serde_json::Value {
    http(
        addr,
        "GET",
        "/api/v1/status",
        &[("Authorization", bearer)],
        None,
    )
    .unwrap()
    .json()
}

/// Hole 9 of issue 15: sign-in limits behind a trusted proxy, the HTTP server's header
/// deadline and connection caps, and the Host guard, against the real coordinator. Every
/// loopback address is a different client to it (127.0.0.5 plays the TLS proxy).
#[test]
fn d3_sign_in_limits_per_client_behind_a_proxy_deadlines_caps_and_host_guard() {
    let mesh = Mesh::new("d3");
    let coord = CoordinatorProc::start_with(
        &mesh,
        "1h",
        &[
            "--trusted-proxy",
            "127.0.0.5/32",
            "--http-host",
            "coord.example.internal",
            "--http-header-timeout",
            "1s",
            "--http-max-connections",
            "8",
            "--http-max-connections-per-source",
            "3",
        ],
    )
    .unwrap();
    let addr = api_addr(&coord);
    let admin = format!("Bearer {}", coord.admin_token);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let (proxy, stranger) = (ip("127.0.0.5"), ip("127.0.0.6"));
    let sign_in = |from: IpAddr, xff: &str, token: &str| {
        let mut h = vec![];
        if !xff.is_empty() {
            h.push(("X-Forwarded-For", xff));
        }
        http_from(
            Some(from),
            addr,
            "POST",
            "/api/v1/session",
            &h,
            Some(&format!("{{\"token\":\"{token}\"}}")),
        )
        .unwrap()
        .status
    };

    // (a) Behind the proxy: the attacker's five bad attempts lock out the attacker
    // (the header's left part is the attacker's to forge, so it changes nothing)...
    let mut codes = Vec::new();
    for i in 0..6 {
        codes.push(sign_in(
            proxy,
            &format!("10.{i}.0.1, 203.0.113.7"),
            "qma_guess",
        ));
    }
    assert_eq!(
        codes,
        [401, 401, 401, 401, 401, 429],
        "the attacker via the proxy"
    );
    // ... and not the admin, who comes through the same proxy.
    assert_eq!(
        sign_in(proxy, "198.51.100.2", &coord.admin_token),
        200,
        "the admin behind the same proxy signs in"
    );
    // Denied twin: a peer that is not a trusted proxy forges X-Forwarded-For, a new
    // address each time: ignored, its own address is limited.
    let mut codes = Vec::new();
    for i in 0..6 {
        codes.push(sign_in(stranger, &format!("192.0.2.{i}"), "qma_guess"));
    }
    assert_eq!(
        codes,
        [401, 401, 401, 401, 401, 429],
        "forged header ignored"
    );
    assert_eq!(sign_in(stranger, "192.0.2.99", &coord.admin_token), 429);
    // And the stranger's flood locks out no one else.
    assert_eq!(sign_in(ip("127.0.0.1"), "", &coord.admin_token), 200);
    let st = status(addr, &admin);
    assert_eq!(st["sign_ins_limited"], 3, "{st}");

    // (b) Slowloris: half a request line, then silence; and a connection that never
    // speaks. Both closed after the 1 s header deadline.
    use std::io::{Read, Write};
    let mut half = connect_from(Some(ip("127.0.0.7")), addr).unwrap();
    half.write_all(b"GET /api/v1/sta").unwrap();
    let silent = connect_from(Some(ip("127.0.0.7")), addr).unwrap();
    let t = std::time::Instant::now();
    for (what, mut s) in [("half a request line", half), ("silent", silent)] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 256];
        let closed =
            matches!(s.read(&mut b), Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(4);
        assert!(
            closed,
            "{what}: closed after the deadline ({:?})",
            t.elapsed()
        );
    }
    println!("slowloris connections closed after {:?}", t.elapsed());
    // The server counts a timed-out connection after hyper has dropped (closed) it, so the
    // count may trail the close the client saw by a moment.
    assert_eventually(
        "both slowloris connections counted as header_timeout",
        Duration::from_secs(5),
        || {
            let st = status(addr, &admin);
            anyhow::ensure!(
                st["http_refused"]["header_timeout"].as_u64() >= Some(2),
                "{st}"
            );
            Ok(())
        },
    );

    // Connection caps: a source holding 3 streams gets no fourth (503), while the admin
    // from another address gets in.
    let attacker = ip("127.0.0.8");
    let mut held: Vec<_> = (0..3)
        .map(|_| hold_events(attacker, addr, &admin).unwrap())
        .collect();
    let refused = hold_events(attacker, addr, &admin).unwrap_err();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert_eq!(status(addr, &admin)["nodes"], 0, "the admin still gets in");
    // The trusted proxy carries everyone: only the total holds it (4 > 3 per source).
    for _ in 0..4 {
        held.push(hold_events(proxy, addr, &admin).unwrap());
    }
    held.push(hold_events(ip("127.0.0.9"), addr, &admin).unwrap());
    // Eight open: the ninth connection, the admin's, is refused...
    let r = http(
        addr,
        "GET",
        "/api/v1/status",
        &[("Authorization", &admin)],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    // ... and gets in once slots free.
    held.clear();
    quicmesh_netns_tests::assert_eventually(
        "the admin gets in once slots free",
        Duration::from_secs(5),
        || {
            let r = http(
                addr,
                "GET",
                "/api/v1/status",
                &[("Authorization", &admin)],
                None,
            )?;
            anyhow::ensure!(r.status == 200, "{}", r.status);
            Ok(())
        },
    );
    let st = status(addr, &admin);
    assert_eq!(st["http_refused"]["source_limit"], 1, "{st}");
    // (At least: a retry may come before the server has seen the streams close.)
    assert!(
        st["http_refused"]["connection_limit"].as_u64() >= Some(1),
        "{st}"
    );

    // (d) DNS rebinding: another site's name as Host is refused (421), with or without
    // a credential; the configured name, localhost and IP literals are served.
    for host in [
        "rebind.evil.example",
        "rebind.evil.example:7780",
        "coord.example.internal.evil",
    ] {
        let r = http(addr, "GET", "/ui/login", &[("Host", host)], None).unwrap();
        assert_eq!(r.status, 421, "{host}: {}", r.body);
        assert!(r.body.contains("DNS rebinding"), "{}", r.body);
        let r = http(
            addr,
            "GET",
            "/api/v1/status",
            &[("Host", host), ("Authorization", &admin)],
            None,
        )
        .unwrap();
        assert_eq!(r.status, 421, "{host} with the admin token");
    }
    for host in [
        "coord.example.internal",
        "COORD.example.internal:443",
        "localhost:7780",
        "127.0.0.1",
    ] {
        let r = http(addr, "GET", "/ui/login", &[("Host", host)], None).unwrap();
        assert_eq!(r.status, 200, "{host}: {}", r.body);
    }
    let st = status(addr, &admin);
    assert_eq!(st["http_refused"]["host_not_allowed"], 6, "{st}");
    drop((coord, mesh));
}

/// The node's metrics listener: a foreign Host (DNS rebinding) is refused and counted,
/// its twin on an IP literal is served.
#[test]
fn d4_node_metrics_refuse_a_foreign_host() {
    let mesh = Mesh::new("d4");
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let node = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1").service("web", echo_server().unwrap()),
    )
    .unwrap();
    let maddr = SocketAddr::from(([127, 0, 0, 1], node.metrics_port));
    let r = http(
        maddr,
        "GET",
        "/metrics",
        &[("Host", "rebind.evil.example:9790")],
        None,
    )
    .unwrap();
    assert_eq!(r.status, 421, "{}", r.body);
    let r = http(maddr, "GET", "/metrics", &[], None).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .contains("quicmesh_http_refused_total{reason=\"host_not_allowed\"} 1"),
        "{}",
        r.body
    );
    drop((node, coord, mesh));
}
