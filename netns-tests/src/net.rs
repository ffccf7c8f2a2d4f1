//! Loopback tools: free ports, echo services, bulk transfers with digests, metrics scraping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A loopback UDP port that was free a moment ago.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A TCP echo service on loopback (threads; runs until the process exits).
pub fn echo_server() -> std::io::Result<SocketAddr> {
    echo_server_on("127.0.0.1:0")
}

/// A TCP echo service on `bind` (call inside a namespace to serve that host).
pub fn echo_server_on(bind: &str) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(bind)?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let Ok(mut w) = r.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// Sends `len` pseudo-random bytes through an echo path at `addr` and reads them back.
/// Returns (sha256 sent, sha256 received, bytes received).
pub fn echo_transfer(addr: SocketAddr, len: usize) -> std::io::Result<(String, String, usize)> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<String> {
        let mut h = Sha256::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            fill(&mut state, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            h.update(&buf[..n]);
            left -= n;
        }
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(hex(&h.finalize()))
    });
    let mut r = s;
    let mut h = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        got += n;
    }
    let sent = writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    Ok((sent, hex(&h.finalize()), got))
}

/// What a paced echo transfer saw.
#[derive(Debug, Clone)]
pub struct Paced {
    /// sha256 of what was sent and of what came back.
    pub sent: String,
    pub received: String,
    pub bytes: usize,
    /// Longest gap between two reads of the echo after the first byte.
    pub max_stall: Duration,
    pub secs: f64,
}

/// Sends `len` pseudo-random bytes through an echo path at `addr` in chunks of `chunk`
/// bytes every `every` (a flow that lasts, so the path can change under it), reading the
/// echo back; reports the longest stall.
pub fn paced_echo(
    addr: SocketAddr,
    len: usize,
    chunk: usize,
    every: Duration,
) -> std::io::Result<Paced> {
    let start = std::time::Instant::now();
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<String> {
        let mut h = Sha256::new();
        let mut state: u64 = 0x1234_5678_9abc_def1;
        let mut buf = vec![0u8; chunk];
        let mut left = len;
        let mut next = std::time::Instant::now();
        while left > 0 {
            let n = left.min(chunk);
            fill(&mut state, &mut buf[..n]);
            w.write_all(&buf[..n])?;
            h.update(&buf[..n]);
            left -= n;
            next += every;
            std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
        }
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(hex(&h.finalize()))
    });
    let mut r = s;
    let mut h = Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last: Option<std::time::Instant> = None;
    let mut max_stall = Duration::ZERO;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let now = std::time::Instant::now();
        if let Some(l) = last {
            max_stall = max_stall.max(now - l);
        }
        last = Some(now);
        h.update(&buf[..n]);
        got += n;
    }
    let sent = writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    Ok(Paced {
        sent,
        received: hex(&h.finalize()),
        bytes: got,
        max_stall,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Fills `buf` from a xorshift generator: cheap, incompressible-looking test bytes.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = *state as u8;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A long-lived echo flow: send a line, expect it back.
#[derive(Debug)]
pub struct LiveFlow {
    stream: TcpStream,
}

impl LiveFlow {
    /// Opens a flow to `addr` and checks one round trip.
    pub fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut f = Self { stream };
        f.ping()?;
        Ok(f)
    }

    /// One round trip of 16 bytes.
    pub fn ping(&mut self) -> std::io::Result<()> {
        let msg = *b"quicmesh-ping-16";
        self.stream.write_all(&msg)?;
        let mut back = [0u8; 16];
        self.stream.read_exact(&mut back)?;
        if back != msg {
            return Err(std::io::Error::other("echo mismatch"));
        }
        Ok(())
    }
}

/// Fetches Prometheus text from a loopback metrics port.
pub fn scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Sums a metric's samples whose labels contain every `key="value"` in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A sink service: reads a connection to its end, then answers `"<bytes> <sha256>\n"`.
pub fn sink_server(bind: &str) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(bind)?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let mut h = Sha256::new();
                let mut n = 0usize;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k;
                        }
                        Err(_) => return,
                    }
                }
                let _ = r.write_all(format!("{n} {}\n", hex(&h.finalize())).as_bytes());
            });
        }
    });
    Ok(addr)
}

/// Pushes `len` pseudo-random bytes to a [`sink_server`] at `addr`. Returns (sha256 sent,
/// the sink's answer `"<bytes> <sha256>"`, seconds from connect to answer).
pub fn sink_transfer(addr: SocketAddr, len: usize) -> std::io::Result<(String, String, f64)> {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut h = Sha256::new();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        fill(&mut state, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok((
        format!("{len} {}", hex(&h.finalize())),
        answer.trim().to_string(),
        start.elapsed().as_secs_f64(),
    ))
}

/// A TCP service that answers each connection with its name and a newline, then closes;
/// stopped (its port refuses connections) by `stop` or drop.
#[derive(Debug)]
pub struct NamedServer {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamedServer {
    /// Serves `name` on `bind` (call inside a namespace to serve that host; binding the
    /// address of a stopped server again restarts it).
    pub fn start(bind: &str, name: &str) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind(bind)?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, answer) = (stop.clone(), format!("{name}\n"));
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(answer.as_bytes());
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener: new connections are refused.
    pub fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NamedServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request to a [`NamedServer`] (through whatever path `addr` leads): its answer.
pub fn ask_name(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let name = out.trim().to_string();
    if name.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    Ok(name)
}

/// One DNS query over UDP: (response code, answer data as text), and how long it took.
pub fn dns_query(
    server: SocketAddr,
    name: &str,
    qtype: hickory_proto::rr::RecordType,
) -> std::io::Result<(hickory_proto::op::ResponseCode, Vec<String>, Duration)> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;
    let bad = |e: hickory_proto::ProtoError| std::io::Error::other(e.to_string());
    let mut q = Message::new();
    q.set_id(rand::random())
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).map_err(bad)?, qtype));
    let sock = UdpSocket::bind(if server.ip().is_loopback() {
        "127.0.0.1:0"
    } else {
        "0.0.0.0:0"
    })?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let start = std::time::Instant::now();
    sock.send_to(&q.to_vec().map_err(bad)?, server)?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf)?;
    let took = start.elapsed();
    let m = Message::from_vec(&buf[..n]).map_err(bad)?;
    let data = m.answers().iter().map(|r| r.data().to_string()).collect();
    Ok((m.response_code(), data, took))
}

/// A stand-in upstream resolver: answers every A query with `answer`, until dropped.
#[derive(Debug)]
pub struct FakeResolver {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeResolver {
    /// Serves on a free loopback port (call inside a namespace to serve that host).
    pub fn start(answer: std::net::Ipv4Addr) -> std::io::Result<Self> {
        use hickory_proto::op::{Message, MessageType};
        use hickory_proto::rr::rdata::A;
        use hickory_proto::rr::{RData, Record};
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let addr = sock.local_addr()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::new();
                r.set_id(q.id()).set_message_type(MessageType::Response);
                for question in q.queries() {
                    r.add_query(question.clone());
                    r.add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(A(answer)),
                    ));
                }
                if let Ok(b) = r.to_vec() {
                    let _ = sock.send_to(&b, from);
                }
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for FakeResolver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
