//! The overlay's IP header parser with extension headers: never panics, and what it
//! says is consistent with the bytes: the addresses are the header's, a later fragment
//! has no transport, bytes appended to a classified packet change nothing, and the ICMP
//! "too big" answer to a packet parses back to an error quoting that packet's flow.
#![no_main]
use libfuzzer_sys::fuzz_target;
use quicmesh_protocol::packet::{self, PacketError, Transport};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fuzz_target!(|data: &[u8]| {
    let parsed = packet::parse(data);
    assert_eq!(parsed, packet::parse(data), "deterministic");
    let info = match parsed {
        Ok(i) => i,
        Err(e) => {
            // Bytes that are not a packet are never called unclassifiable, and back.
            let not_a_packet = matches!(
                e,
                PacketError::Empty
                    | PacketError::Version(_)
                    | PacketError::Truncated
                    | PacketError::HeaderLength(_)
            );
            assert_eq!(e.unclassifiable(), !not_a_packet);
            return;
        }
    };
    let (src, dst): (IpAddr, IpAddr) = match data[0] >> 4 {
        4 => {
            let a = |i: usize| Ipv4Addr::new(data[i], data[i + 1], data[i + 2], data[i + 3]);
            (a(12).into(), a(16).into())
        }
        _ => {
            let a = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&data[i..i + 16]);
                Ipv6Addr::from(o)
            };
            (a(8).into(), a(24).into())
        }
    };
    assert_eq!((info.src, info.dst), (src, dst));
    match (info.transport, info.fragment) {
        (Transport::Fragment { .. }, Some(f)) => assert!(f.offset > 0),
        (Transport::Fragment { .. }, None) => panic!("a later fragment without its datagram"),
        (_, Some(f)) => assert!(f.offset == 0 && f.more, "{f:?}"),
        (_, None) => {}
    }
    if let Transport::IcmpError {
        quoted: Some(q), ..
    } = info.transport
    {
        assert_eq!(q.src.is_ipv4(), info.src.is_ipv4());
        assert_eq!(q.dst.is_ipv4(), info.src.is_ipv4());
    }
    // Payload after the headers does not change the classification (an error's quote
    // cut short may become readable: skip those).
    if !matches!(info.transport, Transport::IcmpError { quoted: None, .. }) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xa5; 64]);
        assert_eq!(packet::parse(&longer), Ok(info));
    }
    // The "too big" answer: an ICMP error from the destination, quoting this flow.
    if let Some(answer) = packet::too_big(data, 1280) {
        let a = packet::parse(&answer).expect("our own answer parses");
        assert_eq!((a.src, a.dst), (info.dst, info.src));
        let Transport::IcmpError { quoted, .. } = a.transport else {
            panic!("the answer is not an ICMP error: {a:?}");
        };
        if let (
            Some(q),
            Transport::Ports {
                proto, src, dst, ..
            },
        ) = (quoted, info.transport)
        {
            assert_eq!((q.src, q.dst), (info.src, info.dst));
            assert_eq!((q.proto, q.src_port, q.dst_port), (proto, src, dst));
        }
    }
});
