//! The WireGuard gateway's entry points, with one client whose session is up: whatever
//! arrives, nothing panics; a datagram the client did not seal never comes out as a
//! packet, and what comes out as a packet is the client's, from the client's own address.
#![no_main]
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use libfuzzer_sys::fuzz_target;
use quicmesh_node::wg::{Gateway, Inbound, BUFFER};
use quicmesh_protocol::ident::{Labels, NodeName, ServiceName};
use quicmesh_protocol::wg::{WgClient, WgKey};
use std::net::{IpAddr, SocketAddr};

const NOW: u64 = 1_900_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut gw = Gateway::new([1; 32]);
    let sk = StaticSecret::from([2; 32]);
    let key = WgKey(*PublicKey::from(&sk).as_bytes());
    let own: IpAddr = "100.64.0.9".parse().unwrap();
    gw.set_clients(vec![WgClient {
        name: NodeName::new("alice").unwrap(),
        service: ServiceName::new("laptop").unwrap(),
        labels: Labels::default(),
        addresses: vec![own],
        public_key: key,
        expires_at: 0,
        gateways: vec![],
    }])
    .unwrap();
    let from: SocketAddr = "198.18.0.10:40000".parse().unwrap();
    let mut alice = Tunn::new(sk, PublicKey::from(gw.public_key().0), None, None, 7, None);
    let (mut buf, mut gbuf) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    let init = match alice.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        _ => unreachable!(),
    };
    let resp = match gw.inbound(from, &init, NOW, &mut gbuf) {
        Inbound::Reply(_, b) => b.to_vec(),
        other => panic!("{other:?}"),
    };
    if let TunnResult::WriteToNetwork(b) = alice.decapsulate(None, &resp, &mut buf) {
        let keepalive = b.to_vec();
        let _ = gw.inbound(from, &keepalive, NOW, &mut gbuf);
    }
    match mode % 3 {
        // Raw bytes off the network: never a packet.
        0 => {
            let r = gw.inbound(from, rest, NOW, &mut gbuf);
            assert!(!matches!(r, Inbound::Packet(..)), "{r:?}");
        }
        // Whatever the client seals: out as a packet only from its own address.
        1 => {
            let sealed = match alice.encapsulate(rest, &mut buf) {
                TunnResult::WriteToNetwork(b) => b.to_vec(),
                _ => return,
            };
            if let Inbound::Packet(k, p) = gw.inbound(from, &sealed, NOW, &mut gbuf) {
                assert_eq!(k, key);
                let src: Option<IpAddr> = match p[0] >> 4 {
                    4 if p.len() >= 20 => Some(<[u8; 4]>::try_from(&p[12..16]).unwrap().into()),
                    6 if p.len() >= 40 => Some(<[u8; 16]>::try_from(&p[8..24]).unwrap().into()),
                    _ => None,
                };
                assert_eq!(src, Some(own), "{p:?}");
            }
        }
        // Packets from the mesh, to any address.
        _ => {
            if rest.len() >= 4 {
                let dst: IpAddr = <[u8; 4]>::try_from(&rest[..4]).unwrap().into();
                let _ = gw.outbound(dst, &rest[4..], NOW, &mut gbuf);
            }
        }
    }
    let mut sent = 0;
    gw.tick(NOW, &mut gbuf, |_, _| sent += 1);
});
