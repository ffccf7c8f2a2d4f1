//! `quicmesh-impair IF_A IF_B CONFIG`: a userspace link between two interfaces.
//!
//! Runs in a namespace of its own between two veths (offloads off, no addresses) and
//! forwards every Ethernet frame from one to the other through AF_PACKET sockets, applying
//! the impairment in CONFIG: delay, jitter, loss, corruption, reordering and a rate limit.
//! CONFIG is re-read whenever it changes, so a test can change the link mid-flow. The same
//! idea as Tailscale's natlab; it needs no `sch_netem`, so it works on any kernel.
//!
//! CONFIG holds `key = value` lines: `delay_ms`, `jitter_ms`, `loss` (0..1), `corrupt`
//! (0..1), `reorder` (0..1, held back by `reorder_ms`), `rate_mbit` (0 = unlimited).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

#[derive(Debug, Clone, Default, PartialEq)]
struct Config {
    delay_ms: f64,
    jitter_ms: f64,
    loss: f64,
    corrupt: f64,
    reorder: f64,
    reorder_ms: f64,
    rate_mbit: f64,
}

fn parse(text: &str) -> Result<Config, String> {
    let mut c = Config {
        reorder_ms: 5.0,
        ..Config::default()
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key = value", i + 1))?;
        let v: f64 = v
            .trim()
            .parse()
            .map_err(|_| format!("line {}: {:?} is not a number", i + 1, v.trim()))?;
        let slot = match k.trim() {
            "delay_ms" => &mut c.delay_ms,
            "jitter_ms" => &mut c.jitter_ms,
            "loss" => &mut c.loss,
            "corrupt" => &mut c.corrupt,
            "reorder" => &mut c.reorder,
            "reorder_ms" => &mut c.reorder_ms,
            "rate_mbit" => &mut c.rate_mbit,
            other => return Err(format!("line {}: unknown key {other:?}", i + 1)),
        };
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("line {}: {k} must be a non-negative number", i + 1));
        }
        *slot = v;
    }
    Ok(c)
}

#[allow(unsafe_code)]
mod packet {
    //! AF_PACKET sockets bound to one interface. The only unsafe code: the syscalls.
    use std::ffi::CString;
    use std::io;

    const ETH_P_ALL: u16 = 0x0003;
    const PACKET_OUTGOING: u8 = 4;

    pub struct Socket {
        fd: i32,
        ifindex: i32,
    }

    impl Socket {
        pub fn bind(ifname: &str) -> io::Result<Self> {
            let name = CString::new(ifname).map_err(|_| io::Error::other("bad interface name"))?;
            // SAFETY: plain syscalls with valid pointers to locals.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                if ifindex == 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ALL).to_be() as i32);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = ETH_P_ALL.to_be();
                sll.sll_ifindex = ifindex;
                let r = libc::bind(
                    fd,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if r < 0 {
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                let buf: libc::c_int = 8 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &buf as *const _ as *const libc::c_void,
                    4,
                );
                Ok(Self { fd, ifindex })
            }
        }

        /// Receives one frame arriving on the interface (frames we sent are skipped).
        pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                // SAFETY: buf and sll are valid for the lengths given.
                let (n, pkttype) = unsafe {
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    let n = libc::recvfrom(
                        self.fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                        &mut sll as *mut _ as *mut libc::sockaddr,
                        &mut len,
                    );
                    (n, sll.sll_pkttype)
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if pkttype != PACKET_OUTGOING {
                    return Ok(n as usize);
                }
            }
        }

        /// Sends one frame out of the interface.
        pub fn send(&self, frame: &[u8]) -> io::Result<()> {
            // SAFETY: frame and sll are valid for the lengths given.
            let n = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_ifindex = self.ifindex;
                sll.sll_halen = 6;
                if frame.len() >= 6 {
                    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
                }
                libc::sendto(
                    self.fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

/// Most frames held in one direction's queue; more are dropped (a bounded link buffer).
const QUEUE_LIMIT: usize = 20_000;

struct Held {
    at: Instant,
    seq: u64,
    frame: Vec<u8>,
}
impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

fn direction(from: Arc<packet::Socket>, to: Arc<packet::Socket>, cfg: Arc<RwLock<Config>>) {
    let queue = Arc::new((
        std::sync::Mutex::new(BinaryHeap::<Reverse<Held>>::new()),
        std::sync::Condvar::new(),
    ));
    let q = queue.clone();
    std::thread::spawn(move || loop {
        let (lock, cv) = &*q;
        let mut heap = lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match heap.peek() {
            Some(Reverse(h)) if h.at <= now => {
                if let Some(Reverse(h)) = heap.pop() {
                    drop(heap);
                    let _ = to.send(&h.frame);
                }
            }
            Some(Reverse(h)) => {
                let wait = h.at - now;
                let _ = cv.wait_timeout(heap, wait);
            }
            None => {
                let _ = cv.wait_timeout(heap, Duration::from_millis(100));
            }
        }
    });
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    let mut link_free = Instant::now();
    loop {
        let n = match from.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("quicmesh-impair: recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let c = cfg.read().map(|c| c.clone()).unwrap_or_default();
        if c.loss > 0.0 && rng.gen::<f64>() < c.loss {
            continue;
        }
        let mut frame = buf[..n].to_vec();
        // Corrupt past the Ethernet and IP headers so the damage reaches UDP/TCP checksums.
        if c.corrupt > 0.0 && n > 42 && rng.gen::<f64>() < c.corrupt {
            let i = rng.gen_range(42..n);
            frame[i] ^= 1 << rng.gen_range(0..8);
        }
        let now = Instant::now();
        let mut delay = c.delay_ms;
        if c.jitter_ms > 0.0 {
            delay += rng.gen_range(-c.jitter_ms..=c.jitter_ms);
        }
        if c.reorder > 0.0 && rng.gen::<f64>() < c.reorder {
            delay += c.reorder_ms;
        }
        let mut at = now + Duration::from_secs_f64(delay.max(0.0) / 1000.0);
        if c.rate_mbit > 0.0 {
            link_free =
                link_free.max(now) + Duration::from_secs_f64(n as f64 * 8.0 / (c.rate_mbit * 1e6));
            at = at.max(link_free);
        }
        seq += 1;
        let (lock, cv) = &*queue;
        let mut heap = lock.lock().unwrap_or_else(|p| p.into_inner());
        if heap.len() < QUEUE_LIMIT {
            heap.push(Reverse(Held { at, seq, frame }));
            cv.notify_one();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, a, b, path] = args.as_slice() else {
        eprintln!("usage: quicmesh-impair IF_A IF_B CONFIG");
        std::process::exit(64);
    };
    let read = |p: &str| -> Result<(Config, Option<SystemTime>), String> {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"))?;
        let m = std::fs::metadata(p).ok().and_then(|m| m.modified().ok());
        Ok((parse(&text)?, m))
    };
    let (first, mut stamp) = match read(path) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("quicmesh-impair: config {e}");
            std::process::exit(64);
        }
    };
    eprintln!("quicmesh-impair: {a} <-> {b} {first:?}");
    let cfg = Arc::new(RwLock::new(first));
    let sa = Arc::new(packet::Socket::bind(a).unwrap_or_else(|e| {
        eprintln!("quicmesh-impair: {a}: {e}");
        std::process::exit(1)
    }));
    let sb = Arc::new(packet::Socket::bind(b).unwrap_or_else(|e| {
        eprintln!("quicmesh-impair: {b}: {e}");
        std::process::exit(1)
    }));
    {
        let (sa, sb, cfg) = (sa.clone(), sb.clone(), cfg.clone());
        std::thread::spawn(move || direction(sa, sb, cfg));
    }
    {
        let (sa, sb, cfg) = (sa.clone(), sb.clone(), cfg.clone());
        std::thread::spawn(move || direction(sb, sa, cfg));
    }
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let m = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
        if m != stamp {
            match read(path) {
                Ok((c, s)) => {
                    eprintln!("quicmesh-impair: now {c:?}");
                    stamp = s;
                    if let Ok(mut w) = cfg.write() {
                        *w = c;
                    }
                }
                Err(e) => eprintln!("quicmesh-impair: config unchanged: {e}"),
            }
        }
    }
}
