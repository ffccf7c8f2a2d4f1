//! HTTP request facts that L7 policy judges: the request target normalised once, the
//! method, the headers. Pure.
//!
//! A path is normalised before it is judged, and the normalised request is what is
//! forwarded, so the policy and the service always see the same path:
//! - every byte that may stand raw in a path is written raw (`/%61dmin` is `/admin`,
//!   `/a%3Ab` is `/a:b`) and every other byte escaped, upper-case (`/café` is
//!   `/caf%C3%A9`): one spelling per path, so a rule cannot be missed by writing the same
//!   path another way;
//! - runs of slashes are merged (`//admin` is `/admin`);
//! - dot segments are removed (`/x/../admin` is `/admin`), after decoding (`%2e%2e` is
//!   `..`), and never above the root.
//!
//! What servers disagree about is refused rather than guessed: `%2F` (a slash inside a
//! segment), `%5C` and a raw `\` (a separator on some servers), `;` and `%3B` (path
//! parameters some servers strip: `/admin;x`), `%25` (decoded again by a server that
//! forwards: `/%2561dmin`), `#` (a fragment some servers drop), `%00` and controls,
//! escapes that are not UTF-8 (overlong `%C0%AE`), and malformed escapes. The query is
//! kept as it came.

use std::fmt;

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    /// Not an origin-form target (`/...`) nor `*`.
    #[error("the request target is not a path starting with '/'")]
    NotOrigin,
    /// `%2F`: a slash inside a segment.
    #[error("an encoded slash (%2F) in the path")]
    EncodedSlash,
    /// `%5C` or a raw backslash.
    #[error("a backslash (raw or %5C) in the path")]
    Backslash,
    /// `%00` or a control character.
    #[error("a NUL or control character in the path")]
    Control,
    /// `%` not followed by two hex digits.
    #[error("a malformed percent-escape in the path")]
    BadEscape,
    /// `;` or `%3B`: a path parameter.
    #[error("a path parameter (';' or %3B) in the path")]
    Semicolon,
    /// `%25`: an escaped percent sign (decoded again by a server that forwards).
    #[error("an escaped percent sign (%25) in the path")]
    DoubleEncoding,
    /// `#`: a fragment, never part of a request.
    #[error("a fragment ('#') in the request target")]
    Fragment,
    /// Escapes that do not decode to UTF-8.
    #[error("escapes in the path that are not UTF-8")]
    NotUtf8,
    /// A method that is not an upper-case token, or `*` with another method than OPTIONS.
    #[error("the method is not an upper-case token (or '*' is asked for with another method than OPTIONS)")]
    BadMethod,
}

impl PathRefusal {
    /// A short stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathRefusal::NotOrigin => "not_origin",
            PathRefusal::EncodedSlash => "encoded_slash",
            PathRefusal::Backslash => "backslash",
            PathRefusal::Control => "control",
            PathRefusal::BadEscape => "bad_escape",
            PathRefusal::Semicolon => "semicolon",
            PathRefusal::DoubleEncoding => "double_encoding",
            PathRefusal::Fragment => "fragment",
            PathRefusal::NotUtf8 => "not_utf8",
            PathRefusal::BadMethod => "bad_method",
        }
    }
}

/// A request target whose path is normalised: what policy judges and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The normalised path.
    pub path: String,
    /// The query after `?`, as it came (`None` without a `?`).
    pub query: Option<String>,
}

impl Target {
    /// Normalises `target` (an origin-form request target: path and optional query).
    pub fn parse(target: &str) -> Result<Self, PathRefusal> {
        if target.contains('#') {
            return Err(PathRefusal::Fragment);
        }
        if target == "*" {
            return Ok(Self {
                path: "*".into(),
                query: None,
            });
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q.to_string())),
            None => (target, None),
        };
        if !path.starts_with('/') {
            return Err(PathRefusal::NotOrigin);
        }
        Ok(Self {
            path: normalize_path(path)?,
            query,
        })
    }
}

/// Checks a request's method (an upper-case token of at most 32 bytes) and normalises
/// its target; `*` only with OPTIONS. What a node judges and forwards, and what `policy
/// explain` and `[[test]]` judge.
pub fn parse_request(method: &str, target: &str) -> Result<(String, Target), PathRefusal> {
    if !is_method(method) {
        return Err(PathRefusal::BadMethod);
    }
    let t = Target::parse(target)?;
    if t.path == "*" && method != "OPTIONS" {
        return Err(PathRefusal::BadMethod);
    }
    Ok((method.to_string(), t))
}

/// An upper-case token of at most 32 bytes.
pub fn is_method(m: &str) -> bool {
    !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase())
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Bytes that stand raw in a normalised path: unreserved, sub-delims but `;`, `:`, `@`.
fn raw_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@".contains(&b)
}

/// Writes one path's bytes in the one spelling (see the module docs), refusing what
/// servers disagree about.
fn decode(path: &str) -> Result<String, PathRefusal> {
    let bytes = path.as_bytes();
    // The path's bytes with every escape decoded (checked as UTF-8 at the end).
    let mut plain: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let v = match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::BadEscape);
                };
                i += 3;
                h * 16 + l
            }
            _ => {
                i += 1;
                b
            }
        };
        match v {
            b'/' if b == b'%' => return Err(PathRefusal::EncodedSlash),
            b'%' => return Err(PathRefusal::DoubleEncoding),
            b'\\' => return Err(PathRefusal::Backslash),
            b';' => return Err(PathRefusal::Semicolon),
            b'#' if b != b'%' => return Err(PathRefusal::Fragment),
            0..=0x1f | 0x7f => return Err(PathRefusal::Control),
            b'/' => out.push('/'),
            v if raw_ok(v) => out.push(char::from(v)),
            v => out.push_str(&format!("%{v:02X}")),
        }
        plain.push(v);
    }
    if std::str::from_utf8(&plain).is_err() {
        return Err(PathRefusal::NotUtf8);
    }
    Ok(out)
}

/// Normalises an absolute path (starting with `/`): see the module docs.
pub fn normalize_path(path: &str) -> Result<String, PathRefusal> {
    if !path.starts_with('/') {
        return Err(PathRefusal::NotOrigin);
    }
    let decoded = decode(path)?;
    let mut segments: Vec<&str> = Vec::new();
    // Whether the path ends in a directory: a trailing slash, `.` or `..`.
    let mut trailing = false;
    for seg in decoded.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathRefusal> {
        normalize_path(p)
    }

    /// The attacks of the issue against a rule on `/admin`: each is the same path once
    /// normalised, or refused.
    #[test]
    fn the_ways_around_a_path_rule_all_come_to_the_same_path_or_are_refused() {
        for p in [
            "//admin",
            "/%61dmin",
            "/x/../admin",
            "/./admin",
            "/%2e%2e/admin",
            "/admin",
        ] {
            assert_eq!(norm(p).as_deref(), Ok("/admin"), "{p}");
        }
        assert_eq!(norm("/admin%2F"), Err(PathRefusal::EncodedSlash));
        assert_eq!(norm("/admin%2f.json"), Err(PathRefusal::EncodedSlash));
        assert_eq!(norm("/x%5C..%5Cadmin"), Err(PathRefusal::Backslash));
        assert_eq!(norm("/x\\..\\admin"), Err(PathRefusal::Backslash));
        assert_eq!(norm("/admin%00.html"), Err(PathRefusal::Control));
        assert_eq!(norm("/admin%0a"), Err(PathRefusal::Control));
        assert_eq!(norm("/admin%"), Err(PathRefusal::BadEscape));
        assert_eq!(norm("/admin%4"), Err(PathRefusal::BadEscape));
        assert_eq!(norm("/admin%zz"), Err(PathRefusal::BadEscape));
    }

    /// The review's bypasses: each is refused, or written the one way a rule is written.
    #[test]
    fn what_servers_read_differently_is_refused_or_spelled_one_way() {
        assert_eq!(norm("/admin;x=y"), Err(PathRefusal::Semicolon));
        assert_eq!(norm("/x/..;/admin"), Err(PathRefusal::Semicolon));
        assert_eq!(norm("/admin%3bx"), Err(PathRefusal::Semicolon));
        assert_eq!(Target::parse("/admin#x"), Err(PathRefusal::Fragment));
        assert_eq!(norm("/%2561dmin"), Err(PathRefusal::DoubleEncoding));
        assert_eq!(norm("/%C0%AE%C0%AE/admin"), Err(PathRefusal::NotUtf8));
        // One spelling: a reserved character that may stand raw is written raw, a byte
        // that may not is escaped, whichever way it came.
        assert_eq!(norm("/v1/users%3Adelete"), norm("/v1/users:delete"));
        assert_eq!(norm("/café"), norm("/caf%c3%a9"));
        assert_eq!(norm("/café").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/a%23b").as_deref(), Ok("/a%23b"));
        assert_eq!(norm("/a%3Fb").as_deref(), Ok("/a%3Fb"));
        assert_eq!(norm("/a%20b").as_deref(), Ok("/a%20b"));
        // Methods, and `*` only for OPTIONS.
        assert_eq!(parse_request("delete", "/x"), Err(PathRefusal::BadMethod));
        assert_eq!(parse_request("GET", "*"), Err(PathRefusal::BadMethod));
        assert!(parse_request("OPTIONS", "*").is_ok());
        let (m, t) = parse_request("DELETE", "/x/../admin?y=1").unwrap();
        assert_eq!((m.as_str(), t.path.as_str()), ("DELETE", "/admin"));
    }

    #[test]
    fn normalising_keeps_what_means_something_else() {
        assert_eq!(norm("/a/./b//c/").as_deref(), Ok("/a/b/c/"));
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/../../..").as_deref(), Ok("/"));
        assert_eq!(norm("/").as_deref(), Ok("/"));
        assert_eq!(norm("/%7euser").as_deref(), Ok("/~user"));
        assert_eq!(norm("/a%3ab").as_deref(), Ok("/a:b"));
        assert_eq!(norm("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
        // `...` is a name, not a dot segment.
        assert_eq!(norm("/.../x").as_deref(), Ok("/.../x"));
    }

    #[test]
    fn the_query_is_kept_as_it_came_and_only_paths_are_targets() {
        let t = Target::parse("//api/%761/?q=%2F&x=..").unwrap();
        assert_eq!(t.path, "/api/v1/");
        assert_eq!(t.query.as_deref(), Some("q=%2F&x=.."));
        assert_eq!(t.to_string(), "/api/v1/?q=%2F&x=..");
        assert_eq!(Target::parse("*").unwrap().path, "*");
        assert_eq!(
            Target::parse("http://evil/admin"),
            Err(PathRefusal::NotOrigin)
        );
        assert_eq!(Target::parse(""), Err(PathRefusal::NotOrigin));
    }
}
