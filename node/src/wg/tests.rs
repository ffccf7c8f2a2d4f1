use super::*;
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName};

const NOW: u64 = 1_900_000_000;

/// A stock WireGuard peer (boringtun's own `Tunn`, as `wireguard-go` would behave).
struct Peer {
    key: WgKey,
    tunn: Tunn,
    addr: SocketAddr,
}

fn secret(seed: u8) -> [u8; 32] {
    let mut s = [seed; 32];
    s[0] &= 248;
    s[31] = (s[31] & 127) | 64;
    s
}

fn peer(gw: &Gateway, seed: u8, addr: &str) -> Peer {
    let sk = StaticSecret::from(secret(seed));
    let key = WgKey(*PublicKey::from(&sk).as_bytes());
    let tunn = Tunn::new(
        sk,
        PublicKey::from(gw.public_key().0),
        None,
        None,
        seed as u32,
        None,
    );
    Peer {
        key,
        tunn,
        addr: addr.parse().unwrap(),
    }
}

fn client(name: &str, key: WgKey, ip: &str) -> WgClient {
    WgClient {
        name: NodeName::new(name).unwrap(),
        service: ServiceName::new("laptop").unwrap(),
        labels: Labels::default(),
        addresses: vec![ip.parse().unwrap()],
        public_key: key,
        expires_at: NOW + 3600,
        gateways: vec![NodeName::new("gw-1").unwrap()],
    }
}

/// An IPv4 packet from `src` to `dst` with `payload` (UDP, no checksum: enough for
/// WireGuard, which checks only the version and the length).
fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (src.parse().unwrap(), dst.parse().unwrap());
    let len = (20 + payload.len()) as u16;
    let mut p = vec![
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(payload);
    p
}

/// The peer's next handshake initiation (`force`: even while one is under way).
fn initiation(p: &mut Peer, force: bool) -> Vec<u8> {
    let mut buf = vec![0u8; BUFFER];
    match p.tunn.format_handshake_initiation(&mut buf, force) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("no initiation: {other:?}"),
    }
}

/// Runs the client's handshake with the gateway; the gateway's answer to the initiation.
fn handshake(gw: &mut Gateway, p: &mut Peer) -> Result<(), WgDrop> {
    let mut buf = vec![0u8; BUFFER];
    let mut gbuf = vec![0u8; BUFFER];
    let init = initiation(p, false);
    let resp = match gw.inbound(p.addr, &init, NOW, &mut gbuf) {
        Inbound::Reply(k, b) => {
            assert_eq!(k, p.key, "answered as the right client");
            b.to_vec()
        }
        Inbound::Drop(r) => return Err(r),
        other => panic!("unexpected {other:?}"),
    };
    match p.tunn.decapsulate(None, &resp, &mut buf) {
        // The client confirms the session with a keepalive.
        TunnResult::WriteToNetwork(b) => {
            let keepalive = b.to_vec();
            assert_eq!(
                gw.inbound(p.addr, &keepalive, NOW, &mut gbuf),
                Inbound::Nothing
            );
        }
        other => panic!("client did not take the answer: {other:?}"),
    }
    Ok(())
}

fn send(gw: &mut Gateway, p: &mut Peer, packet: &[u8]) -> Result<Vec<u8>, WgDrop> {
    let mut buf = vec![0u8; BUFFER];
    let mut gbuf = vec![0u8; BUFFER];
    let wire = match p.tunn.encapsulate(packet, &mut buf) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("client could not send: {other:?}"),
    };
    match gw.inbound(p.addr, &wire, NOW, &mut gbuf) {
        Inbound::Packet(k, b) => {
            assert_eq!(k, p.key);
            Ok(b.to_vec())
        }
        Inbound::Drop(r) => Err(r),
        other => panic!("unexpected {other:?}"),
    }
}

/// A gateway serving one client, alice (100.64.0.9), whose session is up.
fn alice_in_session() -> (Gateway, Peer) {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    handshake(&mut gw, &mut alice).unwrap();
    (gw, alice)
}

#[test]
fn a_client_s_handshake_and_packets_cross_both_ways() {
    let (mut gw, mut alice) = alice_in_session();
    let pkt = ipv4("100.64.0.9", "100.64.0.1", b"hello mesh");
    assert_eq!(send(&mut gw, &mut alice, &pkt).unwrap(), pkt);
    // Back to the client, at the endpoint its datagrams came from.
    let back = ipv4("100.64.0.1", "100.64.0.9", b"hello alice");
    let mut gbuf = vec![0u8; BUFFER];
    let wire = match gw.outbound("100.64.0.9".parse().unwrap(), &back, NOW, &mut gbuf) {
        Outbound::Send(to, b) => {
            assert_eq!(to, alice.addr);
            b.to_vec()
        }
        other => panic!("{other:?}"),
    };
    let mut buf = vec![0u8; BUFFER];
    match alice.tunn.decapsulate(None, &wire, &mut buf) {
        TunnResult::WriteToTunnelV4(p, src) => {
            assert_eq!(p, &back[..]);
            assert_eq!(src.to_string(), "100.64.0.1");
        }
        other => panic!("{other:?}"),
    }
    let stats = gw.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].endpoint, Some(alice.addr));
    assert!(stats[0].since_handshake.is_some());
    assert_eq!(stats[0].rx_bytes, pkt.len() as u64);
    assert_eq!(stats[0].tx_bytes, back.len() as u64);
}

#[test]
fn an_unknown_key_is_dropped_and_never_answered() {
    let mut gw = Gateway::new(secret(1));
    let alice = peer(&gw, 2, "198.18.0.10:40000");
    let mut mallory = peer(&gw, 3, "198.18.0.66:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    assert_eq!(handshake(&mut gw, &mut mallory), Err(WgDrop::UnknownKey));
    // A handshake meant for another gateway's key fails its mac1 before any work.
    let other = Gateway::new(secret(9));
    let mut lost = peer(&other, 4, "198.18.0.67:40000");
    assert_eq!(handshake(&mut gw, &mut lost), Err(WgDrop::BadMac));
    // Noise that is no WireGuard message at all.
    let mut gbuf = vec![0u8; BUFFER];
    assert_eq!(
        gw.inbound(mallory.addr, b"GET / HTTP/1.1", NOW, &mut gbuf),
        Inbound::Drop(WgDrop::Malformed)
    );
}

#[test]
fn data_for_an_index_never_given_out_is_dropped() {
    let (mut gw, mut alice) = alice_in_session();
    let mut buf = vec![0u8; BUFFER];
    let mut wire = match alice
        .tunn
        .encapsulate(&ipv4("100.64.0.9", "100.64.0.1", b"x"), &mut buf)
    {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    let given = gw.index_of(&alice.key).unwrap();
    // The receiver index is bytes 4..8; its top 24 bits name the session.
    let forged = (((given ^ 0x5a5a) & (INDEX_SPACE - 1)) << 8).to_le_bytes();
    wire[4..8].copy_from_slice(&forged);
    let mut gbuf = vec![0u8; BUFFER];
    assert_eq!(
        gw.inbound(alice.addr, &wire, NOW, &mut gbuf),
        Inbound::Drop(WgDrop::UnknownIndex)
    );
}

#[test]
fn an_inner_packet_from_another_address_is_dropped_as_spoofed() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    let bob = peer(&gw, 5, "198.18.0.11:40000");
    gw.set_clients(vec![
        client("alice", alice.key, "100.64.0.9"),
        client("bob", bob.key, "100.64.0.10"),
    ])
    .unwrap();
    handshake(&mut gw, &mut alice).unwrap();
    // Alice's session, bob's address as the source: cryptokey routing refuses it.
    assert_eq!(
        send(
            &mut gw,
            &mut alice,
            &ipv4("100.64.0.10", "100.64.0.1", b"as bob")
        ),
        Err(WgDrop::Spoofed)
    );
    assert!(send(
        &mut gw,
        &mut alice,
        &ipv4("100.64.0.9", "100.64.0.1", b"as alice")
    )
    .is_ok());
}

#[test]
fn a_removed_or_expired_client_is_cut_at_once_and_the_others_keep_their_sessions() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    let mut bob = peer(&gw, 5, "198.18.0.11:40000");
    let (a, b) = (
        client("alice", alice.key, "100.64.0.9"),
        client("bob", bob.key, "100.64.0.10"),
    );
    gw.set_clients(vec![a.clone(), b.clone()]).unwrap();
    handshake(&mut gw, &mut alice).unwrap();
    handshake(&mut gw, &mut bob).unwrap();
    // Alice revoked: her live session carries nothing more; bob's goes on untouched.
    gw.set_clients(vec![b.clone()]).unwrap();
    assert_eq!(
        send(&mut gw, &mut alice, &ipv4("100.64.0.9", "100.64.0.1", b"x")),
        Err(WgDrop::UnknownIndex)
    );
    assert!(send(&mut gw, &mut bob, &ipv4("100.64.0.10", "100.64.0.1", b"y")).is_ok());
    let mut gbuf = vec![0u8; BUFFER];
    assert_eq!(
        gw.outbound("100.64.0.9".parse().unwrap(), b"x", NOW, &mut gbuf),
        Outbound::Drop(WgDrop::NotAClient)
    );
    // Bob expires: refused both ways, from the second of his expiry.
    let expired = WgClient {
        expires_at: NOW,
        ..b
    };
    gw.set_clients(vec![expired]).unwrap();
    let mut buf = vec![0u8; BUFFER];
    let wire = match bob
        .tunn
        .encapsulate(&ipv4("100.64.0.10", "100.64.0.1", b"z"), &mut buf)
    {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        gw.inbound(bob.addr, &wire, NOW, &mut gbuf),
        Inbound::Drop(WgDrop::Expired)
    );
}

#[test]
fn a_client_that_roams_is_answered_at_its_new_address() {
    let (mut gw, mut alice) = alice_in_session();
    alice.addr = "198.18.1.20:51000".parse().unwrap();
    send(
        &mut gw,
        &mut alice,
        &ipv4("100.64.0.9", "100.64.0.1", b"moved"),
    )
    .unwrap();
    let mut gbuf = vec![0u8; BUFFER];
    match gw.outbound(
        "100.64.0.9".parse().unwrap(),
        &ipv4("100.64.0.1", "100.64.0.9", b"r"),
        NOW,
        &mut gbuf,
    ) {
        Outbound::Send(to, _) => assert_eq!(to, alice.addr),
        other => panic!("{other:?}"),
    }
}

#[test]
fn session_indexes_are_unique_never_zero_and_freed_with_their_client() {
    let mut gw = Gateway::new(secret(1));
    let keys: Vec<WgKey> = (0..300u32)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i + 1).to_le_bytes());
            WgKey(k)
        })
        .collect();
    let clients: Vec<WgClient> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| client(&format!("c{i}"), *k, &format!("100.64.1.{}", i % 250 + 1)).clone())
        .map(|mut c| {
            // Distinct addresses beyond 250.
            let n = c.name.as_str()[1..].parse::<u32>().unwrap();
            c.addresses = vec![std::net::Ipv4Addr::from(0x6440_0000 + 256 + n).into()];
            c
        })
        .collect();
    gw.set_clients(clients.clone()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for k in &keys {
        let i = gw.index_of(k).unwrap();
        assert!(i != 0 && i < INDEX_SPACE, "{i}");
        assert!(seen.insert(i), "index {i} given twice");
    }
    // Chosen at random, not counted out: no sender can aim at live sessions by guessing
    // their neighbours (300 indexes from 2^24 all within 100,000 of each other would
    // take a chance of about 10^-400).
    let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
    assert!(hi - lo > 100_000, "indexes {lo}..{hi} look counted");
    // Kept clients keep their index; a new one never takes a live one.
    let kept = gw.index_of(&keys[5]).unwrap();
    gw.set_clients(clients[..10].to_vec()).unwrap();
    assert_eq!(gw.index_of(&keys[5]), Some(kept));
    assert_eq!(gw.index_of(&keys[20]), None, "freed with its client");
    // New clients get indexes no live session holds.
    let mut more = clients[..10].to_vec();
    more.extend(clients[10..13].iter().cloned());
    gw.set_clients(more).unwrap();
    let live: std::collections::HashSet<u32> =
        keys[..13].iter().map(|k| gw.index_of(k).unwrap()).collect();
    assert_eq!(live.len(), 13);
    assert!(live.iter().all(|i| *i != 0 && *i < INDEX_SPACE));
}

#[test]
fn a_client_list_that_would_be_ambiguous_is_refused_whole() {
    let mut gw = Gateway::new(secret(1));
    let alice = peer(&gw, 2, "198.18.0.10:40000");
    let bob = peer(&gw, 5, "198.18.0.11:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    let before = gw.stats();
    assert!(matches!(
        gw.set_clients(vec![
            client("alice", alice.key, "100.64.0.9"),
            client("bob", bob.key, "100.64.0.9"),
        ]),
        Err(ClientsError::SharedAddress(..))
    ));
    assert!(matches!(
        gw.set_clients(vec![
            client("alice", alice.key, "100.64.0.9"),
            client("bob", alice.key, "100.64.0.10"),
        ]),
        Err(ClientsError::SharedKey(_))
    ));
    assert_eq!(gw.stats(), before, "nothing changed");
}

#[test]
fn a_handshake_flood_is_met_with_cookies_and_a_per_source_limit_and_the_client_still_gets_in() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    // A flooder with no key of ours, from one address: up to the shared limit its
    // handshakes are looked at (and dropped, unknown); past it, every one gets a cookie
    // (prove your address first) and no Diffie-Hellman.
    let mut flooder = peer(&gw, 7, "198.18.0.99:5555");
    let mut buf = vec![0u8; BUFFER];
    let mut gbuf = vec![0u8; BUFFER];
    let (mut cookies, mut unknown) = (0, 0);
    let mut cookie = Vec::new();
    for _ in 0..(HANDSHAKES_PER_SECOND + 50) {
        let init = initiation(&mut flooder, true);
        match gw.inbound(flooder.addr, &init, NOW, &mut gbuf) {
            Inbound::Cookie(c) => {
                cookies += 1;
                cookie = c.to_vec();
            }
            Inbound::Drop(WgDrop::UnknownKey) => unknown += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(unknown, HANDSHAKES_PER_SECOND as usize);
    assert_eq!(cookies, 50);
    // Once it answers the cookie from its real address, it is held to the per-source
    // limit: a few more are looked at, the rest refused before any Diffie-Hellman.
    assert!(matches!(
        flooder.tunn.decapsulate(None, &cookie, &mut buf),
        TunnResult::Done
    ));
    let mut limited = 0;
    for _ in 0..(HANDSHAKES_PER_SOURCE + 30) {
        let init = initiation(&mut flooder, true);
        match gw.inbound(flooder.addr, &init, NOW, &mut gbuf) {
            Inbound::Drop(WgDrop::UnknownKey) => {}
            Inbound::Drop(WgDrop::SourceLimit) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, 30);
    // Spoofing the client's address without answering cookies spends nothing of its
    // allowance: every such initiation gets a cookie (sent to the client, useless to it).
    let mut spoofer = peer(&gw, 8, "198.18.0.10:40000");
    for _ in 0..(HANDSHAKES_PER_SOURCE * 3) {
        let init = initiation(&mut spoofer, true);
        assert!(matches!(
            gw.inbound(alice.addr, &init, NOW, &mut gbuf),
            Inbound::Cookie(_)
        ));
    }
    // The real client, under the same load: answered with a cookie, it proves its
    // address and its next initiation is taken.
    let init = initiation(&mut alice, false);
    let cookie = match gw.inbound(alice.addr, &init, NOW, &mut gbuf) {
        Inbound::Cookie(c) => c.to_vec(),
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        alice.tunn.decapsulate(None, &cookie, &mut buf),
        TunnResult::Done
    ));
    let init = initiation(&mut alice, true);
    assert!(
        matches!(gw.inbound(alice.addr, &init, NOW, &mut gbuf), Inbound::Reply(k, _) if k == alice.key),
        "the client is answered under load"
    );
}

/// Under load, a client's own initiation replayed (or relayed) from another address gets
/// a cookie, and a cookie must never move the client's endpoint (found by review: the
/// session's own rate check once answered one after the first check had let it through).
#[test]
fn a_cookie_never_moves_a_client_s_endpoint() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    // Counted once.
    handshake(&mut gw, &mut alice).unwrap();
    let mut gbuf = vec![0u8; BUFFER];
    // Fill the count to its limit, from many sources (each within its own allowance).
    let mut flooder = peer(&gw, 7, "198.18.0.99:5555");
    for i in 0..(HANDSHAKES_PER_SECOND - 1) {
        let init = initiation(&mut flooder, true);
        let src = SocketAddr::from(([198, 18, 1, (i % 250) as u8], 6000));
        assert_eq!(
            gw.inbound(src, &init, NOW, &mut gbuf),
            Inbound::Drop(WgDrop::UnknownKey)
        );
    }
    let init = initiation(&mut alice, true);
    let attacker: SocketAddr = "198.18.0.66:9999".parse().unwrap();
    let r = gw.inbound(attacker, &init, NOW, &mut gbuf);
    assert!(matches!(r, Inbound::Cookie(_)), "{r:?}");
    assert_eq!(
        gw.stats()[0].endpoint,
        Some(alice.addr),
        "the client's endpoint stayed"
    );
}

/// Found by the second review: with the per-source limit applied below the load (where
/// no cookie proves a source's address), anyone knowing the gateway's public key could
/// spend a client's allowance by spoofing its address, and lock it out.
#[test]
fn spoofing_a_client_s_address_does_not_lock_it_out() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    let mut spoofer = peer(&gw, 8, "198.18.0.66:1");
    let mut gbuf = vec![0u8; BUFFER];
    for _ in 0..(HANDSHAKES_PER_SOURCE * 3) {
        let init = initiation(&mut spoofer, true);
        assert_eq!(
            gw.inbound(alice.addr, &init, NOW, &mut gbuf),
            Inbound::Drop(WgDrop::UnknownKey)
        );
    }
    let init = initiation(&mut alice, false);
    assert!(
        matches!(gw.inbound(alice.addr, &init, NOW, &mut gbuf), Inbound::Reply(k, _) if k == alice.key),
        "the client is still answered"
    );
}

/// Found by the third review: the load was decided on a copy of the limiter's count that
/// handshakes too malformed for the limiter still raised (and that reset on another
/// clock), so 400 one-byte datagrams a second made the gateway hold sources to their own
/// limit while none had to prove its address: a spoofer then spent a client's allowance.
/// One count now decides, and only a valid MAC1 raises it.
#[test]
fn malformed_handshakes_do_not_count_toward_the_load() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    let mut gbuf = vec![0u8; BUFFER];
    for i in 0..HANDSHAKES_PER_SECOND {
        let src = SocketAddr::from(([198, 18, 2, (i % 250) as u8], 7000));
        assert_eq!(
            gw.inbound(src, &[1], NOW, &mut gbuf),
            Inbound::Drop(WgDrop::Malformed)
        );
    }
    let mut spoofer = peer(&gw, 8, "198.18.0.66:1");
    for _ in 0..=HANDSHAKES_PER_SOURCE {
        let init = initiation(&mut spoofer, true);
        assert_eq!(
            gw.inbound(alice.addr, &init, NOW, &mut gbuf),
            Inbound::Drop(WgDrop::UnknownKey),
            "below the load: looked at, unknown, no per-source count"
        );
    }
    let init = initiation(&mut alice, false);
    assert!(
        matches!(gw.inbound(alice.addr, &init, NOW, &mut gbuf), Inbound::Reply(k, _) if k == alice.key),
        "the client is still answered"
    );
}

/// An IPv6 host holds a whole /64: its proven handshakes count as one source's, whichever
/// address of the /64 they come from; another /64 has its own allowance.
#[test]
fn an_ipv6_source_is_counted_by_its_64() {
    let gw = Gateway::new(secret(1));
    let gate = gw.gate();
    let mut counts = gate.counts();
    let now = NOW;
    for i in 0..HANDSHAKES_PER_SOURCE {
        let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
        assert!(counts.admit(ip, now));
    }
    assert!(!counts.admit("2001:db8:1:2:ffff::1".parse().unwrap(), now));
    assert!(counts.admit("2001:db8:1:3::1".parse().unwrap(), now));
    // A v4-mapped address is its IPv4 address.
    for _ in 0..HANDSHAKES_PER_SOURCE {
        assert!(counts.admit("198.18.0.1".parse().unwrap(), now));
    }
    assert!(!counts.admit("::ffff:198.18.0.1".parse().unwrap(), now));
}

/// The gate alone (no sessions' lock) refuses keys and indexes no client has, and follows
/// the client list at once: a removed client's index is refused by the gate too. Denied
/// twin of a client's own index passing.
#[test]
fn the_gate_knows_the_clients_keys_and_indexes_without_the_sessions() {
    let mut gw = Gateway::new(secret(1));
    let mut alice = peer(&gw, 2, "198.18.0.10:40000");
    let mut mallory = peer(&gw, 7, "198.18.0.99:5555");
    let a = client("alice", alice.key, "100.64.0.9");
    gw.set_clients(vec![a]).unwrap();
    handshake(&mut gw, &mut alice).unwrap();
    let gate = gw.gate();
    let mut out = vec![0u8; BUFFER];
    let init = initiation(&mut mallory, true);
    assert_eq!(
        gate.check(mallory.addr, &init, NOW, &mut out),
        Err(Refused::Drop(WgDrop::UnknownKey))
    );
    let init = initiation(&mut alice, true);
    assert!(gate.check(alice.addr, &init, NOW, &mut out).is_ok());
    let mut buf = vec![0u8; BUFFER];
    let wire = match alice
        .tunn
        .encapsulate(&ipv4("100.64.0.9", "100.64.0.1", b"x"), &mut buf)
    {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    let admitted = gate.check(alice.addr, &wire, NOW, &mut out).unwrap();
    assert!(admitted.is_data());
    gw.set_clients(vec![]).unwrap();
    assert_eq!(
        gate.check(alice.addr, &wire, NOW, &mut out),
        Err(Refused::Drop(WgDrop::UnknownIndex)),
        "a removed client's index is refused before any session is looked at"
    );
}

/// Cookie replies carry no MAC: any number of them with a live session's index would each
/// reach the sessions. Past a budget of their own they are dropped at the gate. Denied
/// twin: the budget's last one passes.
#[test]
fn cookie_replies_have_a_budget_of_their_own() {
    let mut gw = Gateway::new(secret(1));
    let alice = peer(&gw, 2, "198.18.0.10:40000");
    gw.set_clients(vec![client("alice", alice.key, "100.64.0.9")])
        .unwrap();
    let index = gw.index_of(&alice.key).unwrap() << 8;
    let mut reply = vec![3u8, 0, 0, 0];
    reply.extend_from_slice(&index.to_le_bytes());
    reply.resize(64, 7);
    let gate = gw.gate();
    let mut out = vec![0u8; BUFFER];
    for _ in 0..COOKIE_REPLIES_PER_SECOND {
        assert!(gate.check(alice.addr, &reply, NOW, &mut out).is_ok());
    }
    assert_eq!(
        gate.check(alice.addr, &reply, NOW, &mut out),
        Err(Refused::Drop(WgDrop::UnderLoad))
    );
    // The next second has its budget again.
    assert!(gate.check(alice.addr, &reply, NOW + 1, &mut out).is_ok());
}

/// Found by review: the handshake thread and the data path read the clock apart, and
/// the counts started over on any other second, backwards too: two threads alternating
/// across a boundary reset every limit each time. A second just behind now counts as the
/// current one (denied twin: the source stays at its limit); a later second, or a clock
/// stepped back for real, starts over (allowed twin).
#[test]
fn a_stale_second_does_not_start_the_counts_over() {
    let gw = Gateway::new(secret(1));
    let gate = gw.gate();
    let mut counts = gate.counts();
    let ip: IpAddr = "198.18.0.1".parse().unwrap();
    for _ in 0..HANDSHAKES_PER_SOURCE {
        assert!(counts.admit(ip, NOW));
    }
    assert!(!counts.admit(ip, NOW));
    assert!(
        !counts.admit(ip, NOW - 1),
        "a reading just behind is this second"
    );
    assert!(!counts.admit(ip, NOW), "and did not start the counts over");
    assert!(counts.admit(ip, NOW + 1), "the next second starts over");
    for _ in 1..HANDSHAKES_PER_SOURCE {
        assert!(counts.admit(ip, NOW + 1));
    }
    assert!(!counts.admit(ip, NOW + 1));
    assert!(
        counts.admit(ip, NOW - 3600),
        "a clock stepped back an hour starts over"
    );
}

/// Found by fuzzing: a sealed IPv4 header whose total length (11) is shorter than the
/// header itself came out as an 11-byte packet, its source read past its end (the
/// client's own address there, so it passed cryptokey routing). Dropped as malformed;
/// the same header with its true length passes.
#[test]
fn an_inner_packet_shorter_than_its_own_header_is_dropped() {
    let (mut gw, mut alice) = alice_in_session();
    let mut pkt = ipv4("100.64.0.9", "100.64.0.1", b"x");
    let whole = pkt.clone();
    pkt[2..4].copy_from_slice(&11u16.to_be_bytes());
    assert_eq!(send(&mut gw, &mut alice, &pkt), Err(WgDrop::Malformed));
    assert_eq!(send(&mut gw, &mut alice, &whole).unwrap(), whole);
}

/// From review: a header length under 20 bytes (IHL 0-4) is malformed too, and a
/// malformed packet does not move the client's endpoint (it roams only on packets the
/// gateway takes).
#[test]
fn a_header_length_under_20_is_malformed_and_moves_nothing() {
    let (mut gw, mut alice) = alice_in_session();
    let mut pkt = ipv4("100.64.0.9", "100.64.0.1", b"x");
    pkt[0] = 0x44;
    alice.addr = "198.18.0.77:40001".parse().unwrap();
    assert_eq!(send(&mut gw, &mut alice, &pkt), Err(WgDrop::Malformed));
    assert_eq!(
        gw.stats()[0].endpoint,
        Some("198.18.0.10:40000".parse().unwrap()),
        "the endpoint stayed"
    );
    pkt[0] = 0x45;
    assert!(send(&mut gw, &mut alice, &pkt).is_ok());
    assert_eq!(
        gw.stats()[0].endpoint,
        Some(alice.addr),
        "a packet taken moves it"
    );
}
