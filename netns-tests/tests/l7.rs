//! HTTP awareness end to end on loopback: real coordinator and node processes, a real
//! HTTP service (hyper) and curl as the client.
//!
//! `api-1` hosts `api` with `protocol = "http"` and `db` as plain L4 beside it. `web-1`
//! reaches `api` through an `http` upstream (a stream per request) and through a plain L4
//! upstream (the client's bytes as they come): the destination judges every request
//! either way.

use anyhow::ensure;
use quicmesh_netns_tests::http::{curl, h2_post_with_trailers, HttpService};
use quicmesh_netns_tests::net::{echo_server, echo_transfer, metric};
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
default = "deny"

[[rule]]
from = "web"
to = "api"
action = "allow"

[[rule]]
from = "web"
to = "api"
action = "deny"
paths = ["/admin", "/admin/*"]

[[rule]]
from = "web"
to = "db"
action = "allow"
"#;

struct L7 {
    _mesh: Mesh,
    _coord: CoordinatorProc,
    api: NodeProc,
    web: NodeProc,
    service: HttpService,
}

fn mesh(test: &str) -> L7 {
    let mesh = Mesh::new(test);
    let coord = CoordinatorProc::start(&mesh, "1h").unwrap();
    let out = coord.apply_policy(&mesh, POLICY).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let service = HttpService::start("api-1").unwrap();
    let api = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("api-1")
            .service_with("api", service.addr, &["protocol = \"http\""])
            .service("db", echo_server().unwrap()),
    )
    .unwrap();
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server().unwrap())
            .upstream_with("api", &["protocol = \"http\""])
            .upstream("api")
            .upstream("db")
            .no_egress_check(),
    )
    .unwrap();
    coord.wait_all_acked(2, std::time::Duration::from_secs(15));
    L7 {
        _mesh: mesh,
        _coord: coord,
        api,
        web,
        service,
    }
}

fn apply(m: &L7, policy: &str) -> anyhow::Result<()> {
    let out = m._coord.apply_policy(&m._mesh, policy)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn refused(node: &NodeProc, reason: &str) -> f64 {
    node.metrics()
        .map(|m| {
            metric(
                &m,
                "quicmesh_http_requests_refused_total",
                &[("reason", reason)],
            )
        })
        .unwrap_or(-1.0)
}

#[test]
fn every_spelling_of_a_denied_path_is_denied_and_the_service_never_sees_it() -> anyhow::Result<()> {
    let m = mesh("l7_path_attacks");
    // Both ways in: a stream per request (the http upstream), and the client's own
    // connection carried as bytes (the L4 upstream); the destination judges both.
    for (way, up) in [("http", m.web.upstream_at(0)), ("l4", m.web.upstream_at(1))] {
        let ok = curl(&format!("http://{up}/hello?x=1"), &[])?;
        ensure!(ok.status == 200, "{way}: {ok:?}");
        ensure!(
            ok.body.starts_with("api-1 GET /hello?x=1 src=web"),
            "{way}: the service names the mesh's source: {ok:?}"
        );
        // The denied twin, and the spellings that mean it.
        for path in [
            "/admin",
            "//admin",
            "/%61dmin",
            "/x/../admin",
            "/admin/",
            "/ADMIN",
            "/admin/users",
            "/./admin",
        ] {
            let r = curl(&format!("http://{up}{path}"), &[])?;
            ensure!(r.status == 403, "{way} {path}: {r:?}");
            ensure!(
                r.header("x-quicmesh-rule") == Some("rule[1]"),
                "{way} {path}: the deny names its rule: {r:?}"
            );
            ensure!(
                r.header("x-quicmesh-reason") == Some("policy_denied"),
                "{way} {path}: {r:?}"
            );
        }
        // What servers disagree about is refused before any rule.
        for path in [
            "/admin%2F",
            "/admin%2f",
            "/%2561dmin",
            "/admin;x",
            "/admin%00",
            "/a%5Cadmin",
        ] {
            let r = curl(&format!("http://{up}{path}"), &[])?;
            ensure!(r.status == 400, "{way} {path}: {r:?}");
            ensure!(
                r.header("x-quicmesh-reason") == Some("bad_target"),
                "{way} {path}: {r:?}"
            );
        }
    }
    let seen = m.service.seen();
    ensure!(
        seen.iter()
            .all(|p| !p.to_ascii_lowercase().contains("admin")),
        "the service saw a denied path: {seen:?}"
    );
    ensure!(
        seen.len() == 2,
        "the service saw only the allowed requests: {seen:?}"
    );
    ensure!(
        refused(&m.api, "policy_denied") >= 16.0,
        "counted by reason at the destination"
    );
    ensure!(refused(&m.api, "bad_target") >= 1.0);
    Ok(())
}

#[test]
fn a_normalised_path_is_what_the_service_receives() -> anyhow::Result<()> {
    let m = mesh("l7_normalised");
    let up = m.web.upstream_at(0);
    let r = curl(&format!("http://{up}//a/./b/../c/%7Euser?q=%2F"), &[])?;
    ensure!(r.status == 200, "{r:?}");
    ensure!(r.body.starts_with("api-1 GET /a/c/~user?q=%2F "), "{r:?}");
    // A client's claim to be another service is dropped in every spelling a server might
    // read as the same name: only the mesh names the source.
    let r = curl(
        &format!("http://{up}/who"),
        &[
            "-H",
            "x-quicmesh-source: admin",
            "-H",
            "x_quicmesh_source: admin",
            "-H",
            "X.QUICMESH_SOURCE: admin",
        ],
    )?;
    ensure!(r.body.contains("src=web "), "{r:?}");
    ensure!(
        r.body.matches("quicmesh").count() == 1 && r.body.contains("x-quicmesh-source"),
        "another spelling of the source header reached the service: {r:?}"
    );
    Ok(())
}

#[test]
fn http2_prior_knowledge_and_an_upgrade_pass_and_l4_beside_is_untouched() -> anyhow::Result<()> {
    let m = mesh("l7_h2_upgrade_l4");
    for (way, up) in [("http", m.web.upstream_at(0)), ("l4", m.web.upstream_at(1))] {
        let r = curl(&format!("http://{up}/h2"), &["--http2-prior-knowledge"])?;
        ensure!(r.status == 200, "{way}: {r:?}");
        ensure!(
            r.body.contains("version=HTTP/2.0"),
            "{way}: HTTP/2 end to end: {r:?}"
        );
        let r = curl(&format!("http://{up}/admin"), &["--http2-prior-knowledge"])?;
        ensure!(
            r.status == 403,
            "{way}: HTTP/2 requests are judged too: {r:?}"
        );
        // h2c would hide the requests after it from the policy.
        let r = curl(&format!("http://{up}/x"), &["--http2"])?;
        ensure!(
            r.status == 400 && r.header("x-quicmesh-reason") == Some("unjudgeable"),
            "{way}: {r:?}"
        );
    }
    // An upgrade the service accepts passes, its bytes carried both ways; asked for on a
    // denied path, it is denied like any request.
    for (way, up) in [("http", m.web.upstream_at(0)), ("l4", m.web.upstream_at(1))] {
        let (head, echoed) = upgrade(up, "/ws", b"websocket-ish frames \x00\xff")
            .map_err(|e| anyhow::anyhow!("{way}: {e}"))?;
        ensure!(head.starts_with("HTTP/1.1 101"), "{way}: {head}");
        ensure!(
            echoed == b"websocket-ish frames \x00\xff",
            "{way}: {echoed:?}"
        );
        let (head, _) = upgrade(up, "/admin", b"")?;
        ensure!(head.starts_with("HTTP/1.1 403"), "{way}: {head}");
    }
    // A real WebSocket (tungstenite's client and server) passes both ways; its denied
    // twin on /admin is refused at the handshake.
    for (way, up) in [("http", m.web.upstream_at(0)), ("l4", m.web.upstream_at(1))] {
        let (text, blob) = quicmesh_netns_tests::http::websocket_echo(up, "/ws", "hello")
            .map_err(|e| anyhow::anyhow!("{way}: {e}"))?;
        ensure!(
            text == "hello" && blob,
            "{way}: the WebSocket echoed both messages"
        );
        let denied = quicmesh_netns_tests::http::websocket_echo(up, "/admin", "x");
        ensure!(
            denied
                .as_ref()
                .is_err_and(|e| e.to_string().contains("403")),
            "{way}: {denied:?}"
        );
    }
    // The L4 service beside the HTTP one: every byte as sent.
    let (sent, got, n) = echo_transfer(m.web.upstream_at(2), 4 << 20)?;
    ensure!(sent == got && n == 4 << 20, "L4 bytes changed: {n}");
    Ok(())
}

/// Reads a response head, up to and including its blank line.
fn read_head(s: &mut std::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(
            s.read(&mut b)? == 1,
            "closed in the head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    Ok(head)
}

/// Asks for `Upgrade: echo` on `path`; the response head, and what came back for `data`
/// after a 101.
fn upgrade(
    addr: std::net::SocketAddr,
    path: &str,
    data: &[u8],
) -> anyhow::Result<(String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )?;
    let head = String::from_utf8_lossy(&read_head(&mut s)?).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return Ok((head, Vec::new()));
    }
    s.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)
        .map_err(|e| anyhow::anyhow!("after {head:?}: {e}"))?;
    Ok((head, got))
}

#[test]
fn grpc_unary_and_streaming_pass_with_a_real_client_and_server_and_methods_are_judged(
) -> anyhow::Result<()> {
    use quicmesh_netns_tests::grpc;
    let mesh = Mesh::new("l7_grpc");
    let coord = CoordinatorProc::start(&mesh, "1h")?;
    let policy = r#"
default = "deny"
[[rule]]
from = "web"
to = "echo"
action = "allow"
[[rule]]
from = "web"
to = "echo"
action = "deny"
paths = ["/test.Echo/Secret"]
"#;
    let out = coord.apply_policy(&mesh, policy)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _api = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("api-1").service_with(
            "echo",
            grpc::serve("api-1")?,
            &["protocol = \"http\""],
        ),
    )?;
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server()?)
            .upstream_with("echo", &["protocol = \"http\""])
            .upstream("echo")
            .no_egress_check(),
    )?;
    coord.wait_all_acked(2, std::time::Duration::from_secs(15));
    for (way, up) in [("http", web.upstream_at(0)), ("l4", web.upstream_at(1))] {
        let mut c = grpc::Client::new(up)?;
        let said = c
            .unary("Say", "hi")
            .map_err(|s| anyhow::anyhow!("{way}: {s:?}"))?;
        ensure!(said == "api-1 says hi", "{way}: {said}");
        let chat = c
            .chat(&["one", "two", "three"])
            .map_err(|s| anyhow::anyhow!("{way}: {s:?}"))?;
        ensure!(
            chat == ["ONE", "TWO", "THREE"],
            "{way}: streamed both ways: {chat:?}"
        );
        // The denied twin: a gRPC status the client's library reports, naming the rule.
        let denied = c.unary("Secret", "x").expect_err("denied");
        ensure!(
            denied.code() == tonic::Code::PermissionDenied,
            "{way}: {denied:?}"
        );
        ensure!(denied.message().contains("rule[1]"), "{way}: {denied:?}");
    }
    Ok(())
}

#[test]
fn spans_from_both_nodes_arrive_with_one_trace_id_and_the_service_continues_it(
) -> anyhow::Result<()> {
    use quicmesh_netns_tests::http::Collector;
    let collector = Collector::start()?;
    let telemetry = format!(
        "telemetry = {{ otlp_endpoint = \"http://{}\", access_log = true }}",
        collector.addr
    );
    let mesh = Mesh::new("l7_traces");
    let coord = CoordinatorProc::start(&mesh, "1h")?;
    let out = coord.apply_policy(&mesh, POLICY)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let service = HttpService::start("api-1")?;
    let api = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("api-1")
            .service_with("api", service.addr, &["protocol = \"http\""])
            .config_line(&telemetry),
    )?;
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server()?)
            .upstream_with("api", &["protocol = \"http\""])
            .config_line(&telemetry),
    )?;
    coord.wait_all_acked(2, std::time::Duration::from_secs(15));
    let up = web.upstream_at(0);
    // Started by the mesh: no traceparent from the client.
    let r = curl(&format!("http://{up}/traced"), &[])?;
    ensure!(r.status == 200, "{r:?}");
    let tp = r
        .body
        .split("tp=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or("-")
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    ensure!(parts.len() == 4, "the service got a traceparent: {r:?}");
    let (trace, parent) = (parts[1].to_string(), parts[2].to_string());
    // Continued: the client's trace.
    let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = curl(
        &format!("http://{up}/continued"),
        &["-H", &format!("traceparent: {given}")],
    )?;
    ensure!(
        r.body.contains("tp=00-0af7651916cd43dd8448eb211c80319c-"),
        "{r:?}"
    );
    let (spans, _) = quicmesh_netns_tests::assert_eventually(
        "spans of both requests from both nodes",
        std::time::Duration::from_secs(20),
        || {
            let s = collector.spans();
            ensure!(s.len() >= 4, "{} spans", s.len());
            Ok(s)
        },
    );
    let of = |t: &str| {
        spans
            .iter()
            .filter(|s| s.trace_id == t)
            .cloned()
            .collect::<Vec<_>>()
    };
    let first = of(&trace);
    let client = first.iter().find(|s| s.node == "web-1" && s.kind == 3);
    let server = first.iter().find(|s| s.node == "api-1" && s.kind == 2);
    let (Some(client), Some(server)) = (client, server) else {
        anyhow::bail!("one trace id across both nodes: {spans:?}");
    };
    ensure!(
        server.parent_span_id == client.span_id,
        "the server span is the client span's child"
    );
    ensure!(
        server.span_id == parent,
        "the service's parent is the server span: {tp}"
    );
    ensure!(
        client.parent_span_id.is_empty(),
        "started here: a root span"
    );
    let second = of("0af7651916cd43dd8448eb211c80319c");
    ensure!(second.len() == 2, "continued on both nodes: {spans:?}");
    let c = second.iter().find(|s| s.kind == 3).expect("client span");
    ensure!(
        c.parent_span_id == "b7ad6b7169203331",
        "child of the client's span"
    );
    // The access log names the request and its trace.
    let log = std::fs::read_to_string(&api.log)?;
    ensure!(
        log.lines()
            .any(|l| l.contains("quicmesh::access") && l.contains("/traced") && l.contains(&trace)),
        "an access log line with the trace id"
    );
    Ok(())
}

#[test]
fn a_policy_change_closes_an_upgraded_connection_and_a_streaming_answer_it_denies(
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let m = mesh("l7_recheck");
    let (http, l4) = (m.web.upstream_at(0), m.web.upstream_at(1));
    // Two upgraded connections (through each kind of upstream) and a streaming answer.
    let open = |addr| -> anyhow::Result<std::net::TcpStream> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )?;
        let head = read_head(&mut s)?;
        ensure!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s.write_all(b"ping")?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got)?;
        ensure!(&got == b"ping");
        Ok(s)
    };
    let mut ws = [open(http)?, open(l4)?];
    // Uploads the service answered before reading them (through each kind of upstream):
    // while allowed, they go on after their answer.
    let upload = |addr, path: &str| -> anyhow::Result<()> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        let head = read_head(&mut s)?;
        ensure!(
            head.starts_with(b"HTTP/1.1 200"),
            "{path}: {}",
            String::from_utf8_lossy(&head)
        );
        std::thread::spawn(move || {
            let chunk = format!("400\r\n{}\r\n", "u".repeat(1024));
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until && s.write_all(chunk.as_bytes()).is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(())
    };
    let sinks = ["/sink/http", "/sink/l4"];
    upload(http, sinks[0])?;
    upload(l4, sinks[1])?;
    let before: Vec<u64> = sinks.iter().map(|p| m.service.sunk(p)).collect();
    std::thread::sleep(Duration::from_millis(600));
    for (p, b) in sinks.iter().zip(&before) {
        let now = m.service.sunk(p);
        ensure!(
            now > *b,
            "{p}: the allowed upload goes on after its answer ({b} -> {now})"
        );
    }
    let mut drip = std::net::TcpStream::connect(http)?;
    drip.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(drip, "GET /drip/300 HTTP/1.1\r\nHost: api\r\n\r\n")?;
    let mut first = [0u8; 64];
    ensure!(drip.read(&mut first)? > 0, "the answer streams");
    // The twin that stays allowed: an upgrade on another path.
    let mut kept = std::net::TcpStream::connect(http)?;
    kept.set_read_timeout(Some(Duration::from_secs(15)))?;
    write!(
        kept,
        "GET /chat HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )?;
    let mut head = [0u8; 256];
    let _ = kept.read(&mut head)?;
    let started = Instant::now();
    apply(
        &m,
        &POLICY.replace(
            r#"paths = ["/admin", "/admin/*"]"#,
            r#"paths = ["/admin", "/admin/*", "/ws", "/drip/*", "/sink/*"]"#,
        ),
    )?;
    for (i, s) in ws.iter_mut().enumerate() {
        // Reads end (EOF or reset) once the flow is closed; echoes stop.
        let _ = s.write_all(b"more");
        let mut buf = [0u8; 64];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            ensure!(total <= 4, "upgraded connection {i} still carries bytes");
        }
        ensure!(
            started.elapsed() < Duration::from_secs(8),
            "connection {i} closed in time: {:?}",
            started.elapsed()
        );
    }
    // The uploads are cut with their request's flow: nothing more reaches the service.
    std::thread::sleep(Duration::from_millis(300));
    let cut: Vec<u64> = sinks.iter().map(|p| m.service.sunk(p)).collect();
    std::thread::sleep(Duration::from_millis(1000));
    for (p, c) in sinks.iter().zip(&cut) {
        let now = m.service.sunk(p);
        ensure!(
            now == *c,
            "{p}: the denied upload still reaches the service ({c} -> {now})"
        );
    }
    let mut rest = Vec::new();
    let _ = drip.read_to_end(&mut rest);
    let drips = String::from_utf8_lossy(&rest).matches("drip ").count();
    println!(
        "closed {:?} after the change; the stream stopped after {drips} more chunks",
        started.elapsed()
    );
    ensure!(
        drips < 150,
        "the streaming answer stopped early ({drips} of 300 chunks)"
    );
    // The allowed twin still echoes.
    kept.write_all(b"still")?;
    let mut got = [0u8; 5];
    kept.read_exact(&mut got)?;
    ensure!(&got == b"still", "the allowed upgrade goes on");

    // Allows are exact and judge what is forwarded: a header a client names in
    // `Connection` is gone before the judging, and `x_tenant` is not `x-tenant`.
    apply(
        &m,
        r#"
default = "deny"
[[rule]]
from = "web"
to = "api"
action = "allow"
headers = { x-tenant = "web" }
"#,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let url = format!("http://{http}/t");
    let ok = curl(&url, &["-H", "x-tenant: web"])?;
    ensure!(ok.status == 200, "{ok:?}");
    let hop = curl(&url, &["-H", "x-tenant: web", "-H", "Connection: x-tenant"])?;
    ensure!(
        hop.status == 403,
        "a hop-by-hop header is not judged: {hop:?}"
    );
    let under = curl(&url, &["-H", "x_tenant: web"])?;
    ensure!(
        under.status == 403,
        "an allow matches its header exactly: {under:?}"
    );
    Ok(())
}

#[test]
fn request_trailers_and_an_upgrade_that_declares_a_body_never_reach_the_service(
) -> anyhow::Result<()> {
    use std::io::Write;
    let m = mesh("l7_smuggling");
    let trailers = [("x-quicmesh-source", "admin"), ("x-tenant", "other")];
    // The client and the service do carry trailers: straight to the service they arrive.
    let (status, body) = h2_post_with_trailers(m.service.addr, "/trailers", b"hello", &trailers)?;
    ensure!(
        status == 200 && body.contains("body=5 trailers=x-quicmesh-source,x-tenant"),
        "direct: {status} {body}"
    );
    for (way, up) in [("http", m.web.upstream_at(0)), ("l4", m.web.upstream_at(1))] {
        // Through the mesh the body arrives whole and the trailers are left out: they are
        // headers the policy never judged (an allow may name `x-tenant`), and one could
        // carry the mesh's own `x-quicmesh-source`.
        let (status, body) = h2_post_with_trailers(up, "/trailers", b"hello", &trailers)?;
        ensure!(
            status == 200 && body.contains("body=5 trailers=\n"),
            "{way}: {status} {body}"
        );
        // An upgrade that declares a body: the body would be read by the service as the
        // next request on its connection, one the policy never saw. Refused. (The same
        // upgrade without a body passes: `http2_prior_knowledge_and_an_upgrade_pass...`.)
        let smuggled = "GET /admin HTTP/1.1\r\nHost: api\r\n\r\n";
        let mut s = std::net::TcpStream::connect(up)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\
             Content-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )?;
        let head = read_head(&mut s).map_err(|e| anyhow::anyhow!("{way}: {e}"))?;
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        ensure!(
            head.starts_with("http/1.1 400") && head.contains("x-quicmesh-reason: bad_target"),
            "{way}: {head}"
        );
    }
    let seen = m.service.seen();
    ensure!(
        !seen.iter().any(|p| p == "/admin" || p == "/ws"),
        "the service saw {seen:?}"
    );
    Ok(())
}

#[test]
fn an_http_upstream_reaches_a_plain_l4_service_as_its_stream_verdict_says() -> anyhow::Result<()> {
    // The client's node sends every request framed; the destination's service is plain
    // L4 (no `protocol = "http"`): the stream's verdict (judged as opaque bytes) is the
    // request's, and the request reaches the service as HTTP/1.1.
    let mesh = Mesh::new("l7_to_l4");
    let coord = CoordinatorProc::start(&mesh, "1h")?;
    let policy =
        "default = \"deny\"\n[[rule]]\nfrom = \"web\"\nto = \"plain\"\naction = \"allow\"\n";
    let out = coord.apply_policy(&mesh, policy)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (plain, closed) = (HttpService::start("plain")?, HttpService::start("closed")?);
    let _api = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("api-1")
            .service("plain", plain.addr)
            .service("closed", closed.addr),
    )?;
    let http = ["protocol = \"http\""];
    let web = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("web-1")
            .service("web", echo_server()?)
            .upstream_with("plain", &http)
            .upstream_with("closed", &http)
            .no_egress_check(),
    )?;
    coord.wait_all_acked(2, std::time::Duration::from_secs(15));
    let ok = curl(
        &format!("http://{}/a/../hello?x=1", web.upstream_at(0)),
        &["-X", "POST", "-d", "body"],
    )?;
    ensure!(ok.status == 200, "{ok:?}");
    ensure!(
        ok.body.starts_with("plain POST /hello?x=1 src=web"),
        "{}",
        ok.body
    );
    // The denied twin: no rule allows web -> closed; refused at the stream, named.
    let no = curl(&format!("http://{}/hello", web.upstream_at(1)), &[])?;
    ensure!(no.status == 403, "{no:?}");
    ensure!(
        no.header("x-quicmesh-reason") == Some("policy_denied"),
        "{no:?}"
    );
    ensure!(closed.seen().is_empty(), "the closed service saw nothing");
    Ok(())
}
