//! Load generators and servers shared by the scenarios: a TCP echo and a sink server,
//! and the open-loop request/response client. Every load is bounded in count and time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

pub fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

/// A TCP echo server with Nagle off (request/response latency must not wait on it).
pub fn echo_server(bind: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(bind)?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut r = s;
                let Ok(mut w) = r.try_clone() else { return };
                let mut buf = [0u8; 16384];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// Reads everything, then answers with one byte.
pub fn sink_server(bind: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(bind)?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
                let _ = r.write_all(b"k");
            });
        }
    });
    Ok(())
}

/// Open-loop request/response: each of `conns` connections sends a 1-byte request at its
/// scheduled time whether or not earlier replies came back; latency runs from the
/// scheduled time to the reply (so a stall is charged to every request it delays). The
/// connections' schedules interleave: requests arrive evenly spaced at `rate`.
pub fn open_loop(
    addr: SocketAddr,
    rate: u64,
    secs: u64,
    conns: usize,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let per_conn = (rate as f64 / conns as f64).max(1.0);
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let n = (per_conn * secs as f64) as u64;
    let first = Instant::now() + Duration::from_millis(200);
    let mut handles = Vec::new();
    for c in 0..conns {
        // Each connection's schedule is offset by its share of the interval, so the
        // requests of all connections together arrive evenly spaced at `rate`, as from
        // independent clients; phase-locked, every connection's request left at the same
        // instant and each hop met them as one burst.
        let start = first + interval.mul_f64(c as f64 / conns as f64);
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut w = s.try_clone()?;
        let mut r = s;
        let (tx, rx) = mpsc::channel::<Instant>();
        let sender = std::thread::spawn(move || -> anyhow::Result<()> {
            for i in 0..n {
                let at = start + interval.mul_f64(i as f64);
                loop {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    let left = at - now;
                    if left > Duration::from_micros(300) {
                        std::thread::sleep(left - Duration::from_micros(200));
                    } else {
                        std::hint::spin_loop();
                    }
                }
                tx.send(at)?;
                w.write_all(b"x")?;
            }
            Ok(())
        });
        let receiver = std::thread::spawn(move || -> anyhow::Result<(Histogram<u64>, u64)> {
            let mut h = hist();
            let mut got = 0u64;
            let mut buf = [0u8; 4096];
            while got < n {
                let k = r.read(&mut buf)?;
                if k == 0 {
                    bail!("connection closed after {got} replies");
                }
                let now = Instant::now();
                for _ in 0..k {
                    let at = rx.recv()?;
                    h.record(now.saturating_duration_since(at).as_micros().max(1) as u64)?;
                    got += 1;
                }
            }
            Ok((h, got))
        });
        handles.push((sender, receiver));
    }
    let mut total = hist();
    let mut count = 0;
    for (s, r) in handles {
        s.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let (h, c) = r
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        total.add(&h)?;
        count += c;
    }
    Ok((total, count))
}
