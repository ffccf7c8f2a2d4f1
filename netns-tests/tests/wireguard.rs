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

use quicmesh_netns_tests::net::{dns_query, metric, sink_server, sink_transfer};
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

/// Pushes `mib` MiB to the sink at `to` from `ns`: Mbit/s.
fn throughput(ns: &str, to: SocketAddr, mib: usize) -> f64 {
    let (sent, got, secs) =
        in_ns(ns, move || sink_transfer(to, mib * 1024 * 1024).unwrap()).unwrap();
    assert_eq!(sent, got, "the transfer arrived altered");
    (mib * 8) as f64 * 1.048_576 / secs
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
    let sink = SocketAddr::new(b4, 5202);
    in_ns(&ns_b, move || sink_server(&sink.to_string()).unwrap()).unwrap();
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
    // Each flooded transfer is compared with the quiet one just before it, and the
    // median of the seven ratios is what counts: this machine's speed drifts by more than
    // 10 % between minutes, so the best of each side, taken apart, compared the drift as
    // much as the flood. Each transfer is 80 MiB (~1.5 s): 30 MiB ones (~0.6 s) scattered
    // single ratios from 0.76 to 1.12 and a median of five fell to 0.89 once in CI.
    let (mut ratios, mut rates, mut sent) = (Vec::new(), Vec::new(), 0u64);
    let (mut quiet_all, mut flooded_all) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let quiet = throughput(&ns_phone, sink, 80);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let micros = Arc::new(AtomicU64::new(0));
        let (s2, n2, t2, ns, src) = (
            stop.clone(),
            count.clone(),
            micros.clone(),
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
                    &s2,
                    &n2,
                    &t2,
                )
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let flooded = throughput(&ns_phone, sink, 80);
        stop.store(true, Ordering::Relaxed);
        flooder.join().unwrap();
        let n = count.load(Ordering::Relaxed);
        sent += n;
        rates.push((n as f64 / (micros.load(Ordering::Relaxed) as f64 / 1e6)).round());
        ratios.push(flooded / quiet);
        quiet_all.push(quiet.round());
        flooded_all.push(flooded.round());
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let st = gw.status().unwrap();
    eprintln!(
        "wireguard: quiet {quiet_all:?} Mbit/s, flooded {flooded_all:?} Mbit/s, median ratio {median:.2} under a flood of {} initiations at {rates:?}/s; gateway: {}",
        sent,
        st["gateway"]
    );
    assert!(sent > 8_000, "the flood did not run");
    assert!(
        rates.iter().all(|r| *r >= 3_600.0),
        "the flood fell behind its 4,000 a second: {rates:?}"
    );
    let dropped = &st["gateway"]["dropped"];
    let refused = ["unknown_key", "source_limit"]
        .iter()
        .map(|r| dropped[r].as_u64().unwrap_or(0))
        .sum::<u64>()
        + st["gateway"]["cookies_sent"].as_u64().unwrap_or(0);
    assert!(refused >= sent * 9 / 10, "the flood was not counted: {st}");
    // The gateway reads handshakes on a socket and thread of their own (the kernel steers
    // by message type): the flood takes no slot in the data path's reads and no turn of
    // its loop. With everything on one socket, these VMs measured medians of 0.84-0.89
    // (0.84 with the flooder niced as here); steered, 0.90-0.95 with the flooder at its
    // normal priority, 0.95-0.98 niced.
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
    in_ns(&ns_b, move || {
        let l = TcpListener::bind(cut).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    g2.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    })
    .unwrap();
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

/// Sends WireGuard handshake initiations to `to` at `rate` a second until `stop`, from
/// each of `sources` in turn: from 256 keys the gateway does not know, with a valid MAC1
/// (each one the gateway looks at costs it a Diffie-Hellman), precomputed and replayed.
fn flood(
    gw: quicmesh_protocol::wg::WgKey,
    to: SocketAddr,
    sources: &[IpAddr],
    rate: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
    elapsed: &AtomicU64,
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
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
        let due = start.elapsed().as_secs_f64() * rate as f64;
        while (n as f64) < due {
            let s = &socks[n as usize % socks.len()];
            let _ = s.send_to(&inits[(n % 256) as usize], to);
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    sent.store(n, Ordering::Relaxed);
    elapsed.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
}
