//! A headless Chromium driven over the DevTools protocol (a small WebSocket client of our
//! own), for the dashboard's end-to-end tests, and a plain HTTP/1.1 client for checking
//! what the API answers to raw requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request (`Connection: close`), body as given.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpAnswer> {
    http_from(None, addr, method, path, headers, body)
}

/// A TCP connection to `addr` from source address `from` (any loopback address reaches
/// a loopback listener, each a different client to it), or the default source.
pub fn connect_from(from: Option<std::net::IpAddr>, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let Some(from) = from else {
        return Ok(TcpStream::connect(addr)?);
    };
    let domain = if from.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect(&addr.into())?;
    Ok(s.into())
}

/// [`http`] from source address `from`. A `Host` in `headers` replaces the default one
/// (the address).
pub fn http_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpAnswer> {
    let mut s = connect_from(from, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    req.push_str("Connection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    s.write_all(req.as_bytes())?;
    // Read to the end, or to Content-Length (some servers keep the connection open).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|len| raw.len() >= end + 4 + len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A client WebSocket (text messages; what the DevTools protocol needs).
struct Ws {
    s: TcpStream,
}

impl Ws {
    fn connect(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("not a ws:// url: {url}"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = TcpStream::connect(host)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let key = "cXVpY21lc2gtZGV2dG9vbHM=";
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)?;
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            bail!("websocket upgrade refused: {head}");
        }
        Ok(Self { s })
    }

    fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut f = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n <= u16::MAX as usize {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        let mask: [u8; 4] = rand::random();
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f)?;
        Ok(())
    }

    fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.send_frame(0x1, text.as_bytes())
    }

    fn recv(&mut self) -> anyhow::Result<String> {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h)?;
            let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
            let masked = h[1] & 0x80 != 0;
            let mut n = (h[1] & 0x7f) as u64;
            if n == 126 {
                let mut b = [0u8; 2];
                self.s.read_exact(&mut b)?;
                n = u16::from_be_bytes(b) as u64;
            } else if n == 127 {
                let mut b = [0u8; 8];
                self.s.read_exact(&mut b)?;
                n = u64::from_be_bytes(b);
            }
            let mut mask = [0u8; 4];
            if masked {
                self.s.read_exact(&mut mask)?;
            }
            let mut p = vec![0u8; n as usize];
            self.s.read_exact(&mut p)?;
            if masked {
                for (i, b) in p.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x0..=0x2 => {
                    msg.extend_from_slice(&p);
                    if fin {
                        return Ok(String::from_utf8_lossy(&msg).to_string());
                    }
                }
                0x8 => bail!("devtools closed the websocket"),
                0x9 => self.send_frame(0xA, &p)?,
                _ => {}
            }
        }
    }
}

/// A headless Chromium with one page, driven over the DevTools protocol.
pub struct Browser {
    child: Child,
    ws: Ws,
    next: u64,
    _profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").finish_non_exhaustive()
    }
}

/// The Chromium binary: `$QUICMESH_CHROMIUM`, else Debian's `chromium-headless-shell` or
/// `chromium` (`.ci/run` installs the first).
pub fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QUICMESH_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    // The binary before Debian's wrapper script, which runs it as a child.
    [
        "/usr/lib/chromium/chromium-headless-shell",
        "/usr/bin/chromium-headless-shell",
        "/usr/bin/chromium",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Browser {
    /// Starts Chromium and attaches to its page.
    pub fn launch() -> anyhow::Result<Self> {
        let bin = chromium().ok_or_else(|| {
            anyhow!(
                "no Chromium: apt-get install chromium-headless-shell (or set QUICMESH_CHROMIUM)"
            )
        })?;
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: the browser's helpers (and the browser itself when a
            // wrapper script started it) end with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("Chromium did not open its DevTools port within 30 s"))?;
        let host = browser_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .ok_or_else(|| anyhow!("odd DevTools url {browser_url}"))?;
        let addr: SocketAddr = host.parse()?;
        let list = http(addr, "GET", "/json/list", &[], None)?.json();
        let page = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .ok_or_else(|| anyhow!("no page target in {list}"))?
            .to_string();
        let ws = Ws::connect(&page)?;
        let mut b = Self {
            child,
            ws,
            next: 1,
            _profile: profile,
        };
        b.call("Page.enable", json!({}))?;
        b.call("Runtime.enable", json!({}))?;
        Ok(b)
    }

    /// One DevTools command; its result.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next;
        self.next += 1;
        self.ws
            .send(&json!({"id": id, "method": method, "params": params}).to_string())?;
        loop {
            let m: Value = serde_json::from_str(&self.ws.recv()?)?;
            if m["id"] == id {
                if !m["error"].is_null() {
                    bail!("{method}: {}", m["error"]);
                }
                return Ok(m["result"].clone());
            }
        }
    }

    /// Evaluates JavaScript in the page (promises awaited); its value.
    pub fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        )?;
        if !r["exceptionDetails"].is_null() {
            bail!("{expr}: {}", r["exceptionDetails"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `cond` (JavaScript, truthy when done) every 100 ms for up to `within`.
    pub fn wait(&mut self, what: &str, cond: &str, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            // Navigation may swap the page's context under an evaluation: retry.
            if let Ok(v) = self.eval(&format!("!!({cond})")) {
                if v == Value::Bool(true) {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > within {
                let text = self
                    .eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
                    .unwrap_or_default();
                bail!("{what}: not true within {within:?}; page says: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Navigates and waits for the page to say it is ready.
    pub fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({"url": url}))?;
        self.wait(
            &format!("{url} loads"),
            "document.readyState === 'complete' && (document.body.dataset.page === 'login' || document.body.dataset.ready === '1')",
            Duration::from_secs(15),
        )?;
        Ok(())
    }

    /// Saves a PNG of the page.
    pub fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow!("no screenshot data"))?;
        std::fs::write(
            path,
            base64::engine::general_purpose::STANDARD.decode(data)?,
        )?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The process group this harness started (the browser's own, by its PID).
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
