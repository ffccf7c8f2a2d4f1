//! HTTP request facts that L7 policy judges: the request target normalised once, the
//! method, the headers. Pure.
//!
//! A path is normalised before it is judged, and the normalised request is what is
//! forwarded, so the policy and the service always see the same path:
//! - percent-escapes of unreserved characters are decoded (`/%61dmin` is `/admin`); other
//!   escapes are kept, their hex digits upper-cased;
//! - runs of slashes are merged (`//admin` is `/admin`);
//! - dot segments are removed (`/x/../admin` is `/admin`), after decoding (`%2e%2e` is
//!   `..`), and never above the root.
//!
//! Escapes that servers disagree about are refused rather than guessed: `%2F` (a slash
//! inside a segment), `%5C` and a raw `\` (a separator on some servers), `%00`, a control
//! character, and a malformed escape. The query is kept as it was.

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

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes the escapes of unreserved characters in one path, refusing the ones servers
/// disagree about.
fn decode(path: &str) -> Result<String, PathRefusal> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::BadEscape);
                };
                let v = h * 16 + l;
                match v {
                    b'/' => return Err(PathRefusal::EncodedSlash),
                    b'\\' => return Err(PathRefusal::Backslash),
                    0..=0x1f | 0x7f => return Err(PathRefusal::Control),
                    v if unreserved(v) => out.push(char::from(v)),
                    v => out.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Backslash),
            0..=0x1f | 0x7f => return Err(PathRefusal::Control),
            _ => {
                // A UTF-8 sequence is copied whole (`path` is a str).
                let len = utf8_len(b);
                out.push_str(&path[i..i + len]);
                i += len;
            }
        }
    }
    Ok(out)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
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

    #[test]
    fn normalising_keeps_what_means_something_else() {
        assert_eq!(norm("/a/./b//c/").as_deref(), Ok("/a/b/c/"));
        assert_eq!(norm("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(norm("/../../..").as_deref(), Ok("/"));
        assert_eq!(norm("/").as_deref(), Ok("/"));
        assert_eq!(norm("/%7euser").as_deref(), Ok("/~user"));
        // Reserved characters stay escaped (upper-cased): `%3A` is not `:` to every server.
        assert_eq!(norm("/a%3ab").as_deref(), Ok("/a%3Ab"));
        assert_eq!(norm("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/café").as_deref(), Ok("/café"));
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
