//! The WireGuard gateway with a stock client: `wireguard-go`, `wg` and `ip` from the
//! distribution, configured from the exact text `quicmesh-coordinator wg add` printed.
//!
//! ```text
//!   lan a 198.18.24.0/24                                  lan b 198.18.25.0/24
//!   gw .10 (gateway), coordinator .20,       r .1 | .1 --- node-b .10 (api, admin)
//!   phone .30 (wireguard-go; roams to .31), mallory .40
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicmesh_netns_tests::net::{dns_query, metric};
use quicmesh_netns_tests::topo::{
    echo_round_trip, exec, in_ns, ping_until, tcp_echo_in, udp_echo_in, Net,
};
use quicmesh_netns_tests::wg::stock_client;
use quicmesh_netns_tests::{CoordinatorProc, Mesh, NodeProc, NodeSpec};

const POLICY: &str = r#"
default = "deny"
[[rule]]
from = "laptop"
to = "api"
action = "allow"
"#;

/// The node's overlay IPv4 address, once its device is up.
fn overlay_v4(n: &NodeProc) -> IpAddr {
    n.overlay_addrs(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .find(IpAddr::is_ipv4)
        .unwrap_or_else(|| panic!("{} has no overlay IPv4 address", n.name))
}

fn dropped_at(n: &NodeProc, reason: &str) -> f64 {
    metric(
        &n.metrics().unwrap_or_default(),
        "quicmesh_overlay_dropped_total",
        &[("reason", reason)],
    )
}

/// The gateway's `status` entry for client `name`.
fn client_status(gw: &NodeProc, name: &str) -> serde_json::Value {
    let st = gw.status().unwrap();
    st["gateway"]["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_stock_wireguard_client_reaches_the_mesh_under_its_own_identity_and_policy() {
    let mesh = Mesh::new("wg1");
    let mut net = Net::new("wg1", mesh.path()).unwrap();
    let a = net.lan("a", "198.18.24").unwrap();
    let b = net.lan("b", "198.18.25").unwrap();
    net.router("r", &[(&a, 1), (&b, 1)]).unwrap();
    let ns_gw = net.host("gw", &a, 10, Some(1)).unwrap();
    let ns_ctl = net.host("ctl", &a, 20, Some(1)).unwrap();
    // The phone sits behind two NAT routers to lan a; it roams by switching from one
    // to the other (its packets then reach the gateway from a new address).
    let home = net.lan("home", "198.18.26").unwrap();
    let nat1 = net.router("nat1", &[(&home, 1), (&a, 30)]).unwrap();
    let nat2 = net.router("nat2", &[(&home, 2), (&a, 31)]).unwrap();
    net.masquerade(&nat1, "eth1", false).unwrap();
    net.masquerade(&nat2, "eth1", false).unwrap();
    let ns_phone = net.host("phone", &home, 10, Some(1)).unwrap();
    let ns_mallory = net.host("mallory", &a, 40, Some(1)).unwrap();
    let ns_b = net.host("b", &b, 10, Some(1)).unwrap();
    let coord = CoordinatorProc::start_in(&mesh, "1h", &ns_ctl, [198, 18, 24, 20].into()).unwrap();
    coord.apply_policy(&mesh, POLICY).unwrap();
    let gw = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("gw")
            .on(&ns_gw)
            .overlay("qm0")
            .overlay_service("gateway", &["udp/9"])
            .dns()
            .section("[gateway.wireguard]\nlisten = \"0.0.0.0:51820\""),
    )
    .unwrap();
    let node_b = NodeProc::start(
        &mesh,
        &coord,
        &NodeSpec::new("node-b")
            .on(&ns_b)
            .overlay("qm0")
            .overlay_service(
                "api",
                &["icmp", "tcp/5201", "tcp/5202", "tcp/5203", "udp/5353"],
            )
            .overlay_service("admin", &["tcp/6000"]),
    )
    .unwrap();
    coord.wait_all_acked(2, Duration::from_secs(20));
    let gw4 = overlay_v4(&gw);
    let b4 = overlay_v4(&node_b);
    for port in [5201, 6000] {
        tcp_echo_in(&ns_b, SocketAddr::new(b4, port));
    }
    let udp = SocketAddr::new(b4, 5353);
    udp_echo_in(&ns_b, udp);

    // `wg add` is refused until the gateway has told the coordinator its key; then it
    // prints the configuration, private key included, once.
    let t = Instant::now();
    let config = loop {
        let out = coord
            .cli(&[
                "wg",
                "add",
                "--name",
                "phone",
                "--service",
                "laptop",
                "--label",
                "owner=alice",
                "--gateway",
                "gw",
            ])
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("has not reported"), "wg add: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "gateway never reported: {err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        config.contains("[Interface]") && config.contains("PrivateKey = "),
        "{config}"
    );
    assert!(config.contains("Endpoint = 198.18.24.10:51820"), "{config}");
    assert!(config.contains(&format!("DNS = {gw4}")), "{config}");
    let phone4: IpAddr = config
        .lines()
        .find_map(|l| l.strip_prefix("Address = "))
        .and_then(|v| v.split(',').next())
        .and_then(|a| a.trim().trim_end_matches("/32").parse().ok())
        .unwrap();
    let _client = stock_client(&ns_phone, mesh.path(), "qmwg1", &config).unwrap();

    // Ping and TCP to the allowed service.
    assert!(
        ping_until(&ns_phone, b4, Duration::from_secs(15)),
        "no ping reply through the gateway"
    );
    echo_round_trip(&ns_phone, SocketAddr::new(b4, 5201)).unwrap();
    let st = client_status(&gw, "phone");
    assert!(st["last_handshake_secs"].as_u64().is_some(), "{st}");
    assert!(st["rx_bytes"].as_u64().unwrap_or(0) > 0, "{st}");

    // Its denied twin: `admin` on the same node. Refused at node-b, counted there with
    // the client's identity.
    let before = dropped_at(&node_b, "policy_denied");
    assert!(echo_round_trip(&ns_phone, SocketAddr::new(b4, 6000)).is_err());
    assert!(
        dropped_at(&node_b, "policy_denied") > before,
        "denied SYN not counted at node-b"
    );
    let st = node_b.status().unwrap();
    assert!(
        st["overlay"]["wireguard_clients_dropped"]["phone"]["policy_denied"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{st}"
    );
    let log = std::fs::read_to_string(&node_b.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WireGuard client's packet dropped")
                && l.contains("phone")
                && l.contains("laptop")),
        "node-b's log names the client and its service"
    );

    // DNS from the gateway, on its overlay address, as the configuration says.
    let td = gw.status().unwrap()["trust_domain"]
        .as_str()
        .unwrap()
        .to_string();
    let dns = SocketAddr::new(gw4, 53);
    let name = format!("api.svc.{td}");
    let (rc, answers, _) = in_ns(&ns_phone, move || {
        dns_query(dns, &name, hickory_proto::rr::RecordType::A).unwrap()
    })
    .unwrap();
    assert_eq!(rc, hickory_proto::op::ResponseCode::NoError);
    assert_eq!(
        answers,
        vec![b4.to_string()],
        "the client resolves mesh names"
    );

    // A mesh node reaches the client only on a flow the client opened: the UDP echo's
    // answers come back; node-b opening a flow of its own to the client does not pass.
    let answered = in_ns(&ns_phone, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        (0..20u32)
            .filter(|i| {
                s.send_to(&i.to_be_bytes(), udp).unwrap();
                let mut b = [0u8; 8];
                matches!(s.recv_from(&mut b), Ok((4, _)) if b[..4] == i.to_be_bytes())
            })
            .count()
    })
    .unwrap();
    assert!(
        answered >= 19,
        "only {answered} of 20 answers reached the client"
    );
    let listener = SocketAddr::new(phone4, 7000);
    in_ns(&ns_phone, move || {
        let l = TcpListener::bind(listener).unwrap();
        std::thread::spawn(move || for _ in l.incoming() {});
    })
    .unwrap();
    // node-b's own connection to the phone: no rule lets its services reach `laptop`.
    // Refused where it starts (node-b judges its flows to clients; the gateway, the
    // client's firewall, would refuse it too: the tracker's tests).
    let before = dropped_at(&node_b, "policy_denied");
    let reached = in_ns(&ns_b, move || {
        TcpStream::connect_timeout(&listener, Duration::from_secs(2)).is_ok()
    })
    .unwrap();
    assert!(!reached, "node-b opened a connection to the client");
    assert!(
        dropped_at(&node_b, "policy_denied") > before,
        "node-b's refused flow to the client was not counted"
    );

    // Roaming: the phone moves to the other NAT (a new network): its packets reach the
    // gateway from a new address, and the session follows them.
    exec(
        &ns_phone,
        &["ip", "route", "replace", "default", "via", "198.18.26.2"],
    )
    .unwrap();
    assert!(
        ping_until(&ns_phone, b4, Duration::from_secs(15)),
        "no reply after roaming"
    );
    echo_round_trip(&ns_phone, SocketAddr::new(b4, 5201)).unwrap();
    let st = client_status(&gw, "phone");
    assert_eq!(
        st["endpoint"]
            .as_str()
            .map(|e| e.starts_with("198.18.24.31:")),
        Some(true),
        "{st}"
    );

    // A handshake flood from a host that is no client, from 16 addresses (valid MAC1,
    // 4,000 initiations a second, ten times the rate past which cookies are asked, from
    // keys the gateway does not know): the client's throughput holds within 10 %.
    let sources: Vec<IpAddr> = (41..57u8).map(|h| IpAddr::from([198, 18, 24, h])).collect();
    for ip in &sources {
        exec(
            &ns_mallory,
            &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
        )
        .unwrap();
    }
    let gw_key: quicmesh_protocol::wg::WgKey = gw.status().unwrap()["gateway"]["public_key"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // One continuous transfer, the flood switched on and off every half second: each
    // flooded window is compared with the quiet windows on either side of it, and the
    // median of ten such ratios is what counts. (Separate transfers, quiet then flooded,
    // compared this machine's drift between seconds as much as the flood: single ratios
    // scattered from 0.67 to 1.18.)
    let counted = SocketAddr::new(b4, 5202);
    let got = Arc::new(AtomicU64::new(0));
    let g2 = got.clone();
    in_ns(&ns_b, move || counting_server(counted, g2)).unwrap();
    let on = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let sent_on = Arc::new(AtomicU64::new(0));
    let (o2, s2, n2, ns, src) = (
        on.clone(),
        stop.clone(),
        sent_on.clone(),
        ns_mallory.clone(),
        sources.clone(),
    );
    let flooder = std::thread::spawn(move || {
        in_ns(&ns, move || {
            flood(
                gw_key,
                "198.18.24.10:51820".parse().unwrap(),
                &src,
                4_000,
                &o2,
                &s2,
                &n2,
            )
        })
        .unwrap()
    });
    let (s3, ns_phone_w) = (stop.clone(), ns_phone.clone());
    let writer =
        std::thread::spawn(move || in_ns(&ns_phone_w, move || push_until(counted, &s3)).unwrap());
    const WINDOW: Duration = Duration::from_millis(500);
    // Each window's rate is taken over its last 400 ms (TCP settles after a switch).
    const SETTLE: Duration = Duration::from_millis(100);
    // What the gateway refused so far (cookies, unknown keys, source limits): each window
    // shows the flood reached it while on, and not while off.
    let refused_so_far = || -> u64 {
        let st = gw.status().unwrap();
        let dropped = &st["gateway"]["dropped"];
        ["unknown_key", "source_limit"]
            .iter()
            .map(|r| dropped[r].as_u64().unwrap_or(0))
            .sum::<u64>()
            + st["gateway"]["cookies_sent"].as_u64().unwrap_or(0)
    };
    let window = |flooded: bool| -> (f64, u64) {
        on.store(flooded, Ordering::Relaxed);
        let r0 = refused_so_far();
        std::thread::sleep(SETTLE);
        let (b0, t0) = (got.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(WINDOW - SETTLE);
        let (b1, t1) = (got.load(Ordering::Relaxed), Instant::now());
        let refused = refused_so_far() - r0;
        (
            (b1 - b0) as f64 * 8.0 / 1e6 / (t1 - t0).as_secs_f64(),
            refused,
        )
    };
    std::thread::sleep(Duration::from_secs(1));
    let (q, r) = window(false);
    let (mut quiet_all, mut quiet_refused) = (vec![q], vec![r]);
    let (mut flooded_all, mut flooded_refused) = (Vec::new(), Vec::new());
    let mut flood_time = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let (f, r) = window(true);
        flood_time += t.elapsed();
        flooded_all.push(f);
        flooded_refused.push(r);
        let (q, r) = window(false);
        quiet_all.push(q);
        quiet_refused.push(r);
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();
    writer.join().unwrap();
    eprintln!(
        "wireguard: refused per window, flooded {flooded_refused:?}, quiet {quiet_refused:?}; sent {} in {flood_time:?}",
        sent_on.load(Ordering::Relaxed)
    );
    // Each flooded window holds at least a tenth of a second of the flood (400 refused;
    // about 2,000 when the flooder keeps its rate); quiet ones get only the
    // tail of what the (lower-priority) handshake thread had not yet taken.
    assert!(
        flooded_refused.iter().all(|r| *r >= 400),
        "the flood did not reach the gateway in every flooded window: {flooded_refused:?}"
    );
    assert!(
        quiet_refused.iter().sum::<u64>() * 10 <= flooded_refused.iter().sum::<u64>(),
        "the flood went on into quiet windows: {quiet_refused:?} against {flooded_refused:?}"
    );
    let sent = sent_on.load(Ordering::Relaxed);
    let rate = sent as f64 / flood_time.as_secs_f64();
    let mut ratios: Vec<f64> = flooded_all
        .iter()
        .enumerate()
        .map(|(i, f)| f / ((quiet_all[i] + quiet_all[i + 1]) / 2.0))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = (ratios[4] + ratios[5]) / 2.0;
    let st = gw.status().unwrap();
    let round = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
    eprintln!(
        "wireguard: quiet {:?} Mbit/s, flooded {:?} Mbit/s, median ratio {median:.2} under a flood of {sent} initiations at {rate:.0}/s; gateway: {}",
        round(&quiet_all),
        round(&flooded_all),
        st["gateway"]
    );
    assert!(
        quiet_all.iter().all(|q| *q > 10.0),
        "the transfer stalled: {quiet_all:?}"
    );
    // Niced, the flooder falls behind on a busy second (3,000-3,500 a second measured);
    // it must still flood at many times the load (400 a second).
    assert!(
        rate >= 2_000.0,
        "the flood fell behind its 4,000 a second: {rate:.0}"
    );
    let dropped = &st["gateway"]["dropped"];
    let refused = ["unknown_key", "source_limit"]
        .iter()
        .map(|r| dropped[r].as_u64().unwrap_or(0))
        .sum::<u64>()
        + st["gateway"]["cookies_sent"].as_u64().unwrap_or(0);
    assert!(refused >= sent * 9 / 10, "the flood was not counted: {st}");
    // Two protections keep the flood off the client's traffic, and either one alone holds
    // it here: cookies (past 400 handshakes a second no Diffie-Hellman is spent on an
    // unproven source) and handshakes read on a socket and thread of their own, at a lower
    // priority (the kernel steers by message type). Measured on the 2-vCPU VMs of
    // 2026-12-02: both on, medians 0.95-1.02; steering off, 0.85-0.96; cookies off,
    // 1.00-1.02; both off, 0.69 and 0.79 (the test fails).
    assert!(
        median >= 0.9,
        "the client kept a median {median:.2} of its quiet throughput under the flood (ratios {ratios:.2?})"
    );
    assert_eq!(
        st["gateway"]["handshakes_apart"], true,
        "handshakes are read apart from the data: {st}"
    );

    // What the dashboard shows: the coordinator knows the client's last handshake and its
    // bytes from the gateway's reports; a configuration comes with its QR code.
    quicmesh_netns_tests::assert_eventually(
        "the gateway's report reaches the coordinator",
        Duration::from_secs(10),
        || {
            let v = coord.api_get("wg")?;
            let c = &v["clients"][0];
            anyhow::ensure!(c["name"] == "phone", "{v}");
            anyhow::ensure!(c["last_handshake"].as_i64().is_some(), "{v}");
            anyhow::ensure!(c["rx_bytes"].as_u64().unwrap_or(0) > 100 << 20, "{v}");
            Ok(())
        },
    );
    let added = coord
        .json(&[
            "wg",
            "add",
            "--name",
            "tablet",
            "--service",
            "laptop",
            "--gateway",
            "gw",
        ])
        .unwrap();
    let qr = &added["config_qr"];
    let width = qr["width"].as_u64().unwrap() as usize;
    assert!(
        width >= 21 && (width - 21).is_multiple_of(4),
        "a QR code's width: {qr}"
    );
    assert_eq!(qr["modules"].as_str().unwrap().len(), width * width);
    assert!(added["config"].as_str().unwrap().contains("PrivateKey = "));

    // Revocation cuts a live transfer within 1 s: counted where the bytes arrive, at
    // node-b (what the phone's own kernel still held proves nothing about the gateway).
    let got = Arc::new(AtomicU64::new(0));
    let g2 = got.clone();
    let cut = SocketAddr::new(b4, 5203);
    in_ns(&ns_b, move || counting_server(cut, g2)).unwrap();
    let ns = ns_phone.clone();
    let writer = std::thread::spawn(move || {
        in_ns(&ns, move || {
            let Ok(mut s) = TcpStream::connect_timeout(&cut, Duration::from_secs(3)) else {
                return;
            };
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            let chunk = vec![7u8; 16 * 1024];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        })
        .unwrap()
    });
    let t = Instant::now();
    while got.load(Ordering::Relaxed) < 1024 * 1024 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the live transfer never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let revoked_at = Instant::now();
    let out = coord.cli(&["wg", "revoke", "phone"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = (got.load(Ordering::Relaxed), Instant::now());
    while last.1.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(10));
        let n = got.load(Ordering::Relaxed);
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "the transfer never stopped"
        );
    }
    let cut_after = last.1.saturating_duration_since(revoked_at);
    eprintln!("wireguard: revocation cut the live transfer {cut_after:?} after `wg revoke`");
    assert!(
        cut_after < Duration::from_secs(1),
        "bytes still flowed {cut_after:?} after the revocation"
    );
    assert!(
        !ping_until(&ns_phone, b4, Duration::from_secs(3)),
        "a revoked client still pings"
    );
    writer.join().unwrap();
}

/// Sends WireGuard handshake initiations to `to` at `rate` a second while `on`, until
/// `stop`, from each of `sources` in turn: from 256 keys the gateway does not know, with a
/// valid MAC1 (each one the gateway looks at costs it a Diffie-Hellman), precomputed and
/// replayed. `sent` counts what it sent while on.
fn flood(
    gw: quicmesh_protocol::wg::WgKey,
    to: SocketAddr,
    sources: &[IpAddr],
    rate: u64,
    on: &AtomicBool,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    let inits: Vec<Vec<u8>> = (0..256u32)
        .map(|i| {
            let (secret, _) = quicmesh_node::wg::generate_key_pair();
            let mut t = Tunn::new(
                StaticSecret::from(secret),
                PublicKey::from(gw.0),
                None,
                None,
                i,
                None,
            );
            let mut buf = vec![0u8; 256];
            match t.format_handshake_initiation(&mut buf, true) {
                TunnResult::WriteToNetwork(b) => b.to_vec(),
                _ => panic!("no initiation"),
            }
        })
        .collect();
    let socks: Vec<UdpSocket> = sources
        .iter()
        .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).unwrap())
        .collect();
    // The attacker's CPU is not the gateway's: here both share two cores, so the flooder
    // yields to everything else (its sends' kernel work, which a gateway's host would do
    // on receive, yields with it). Its rate is checked by the caller.
    rustix::process::nice(19).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    // Where the schedule starts: each time the flood is switched on.
    let mut since: Option<(Instant, u64)> = None;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
        if !on.load(Ordering::Relaxed) {
            since = None;
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let (t0, n0) = *since.get_or_insert((Instant::now(), n));
        let due = n0 + (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        // Niced, it is often late on a busy second and catches up in a burst; a burst
        // stops the moment the flood is switched off, and more than 100 ms owed is let go.
        if due > n + rate / 10 {
            since = Some((Instant::now(), n));
            continue;
        }
        while n < due && on.load(Ordering::Relaxed) {
            let s = &socks[n as usize % socks.len()];
            let _ = s.send_to(&inits[(n % 256) as usize], to);
            n += 1;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A TCP server on `bind` that reads everything sent to it and adds it to `got`.
fn counting_server(bind: SocketAddr, got: Arc<AtomicU64>) {
    let l = TcpListener::bind(bind).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let got = got.clone();
            std::thread::spawn(move || {
                let mut r = s;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(k) = r.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    got.fetch_add(k as u64, Ordering::Relaxed);
                }
            });
        }
    });
}

/// Pushes fresh pseudo-random bytes to `to` as fast as the path takes them, until `stop`:
/// made as they go, as an application's would be, so the sender's CPU is part of the
/// load the two cores carry.
fn push_until(to: SocketAddr, stop: &AtomicBool) {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .expect("the client reaches the counting server through the gateway");
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut state: u64 = 0x1234_5678_9abc_def1;
    while !stop.load(Ordering::Relaxed) {
        for b in buf.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        s.write_all(&buf)
            .expect("the transfer through the gateway goes on");
    }
}
