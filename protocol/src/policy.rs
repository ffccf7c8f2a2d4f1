//! The policy model: a TOML file users keep in git, parsed into a checked [`Policy`],
//! evaluated as a pure function of `(source, destination)`.
//!
//! Evaluation: every rule whose `from` and `to` match is a candidate. The most specific
//! candidates win (a service name is more specific than a tag, a tag more than `*`;
//! destination specificity counts first). Among equally specific candidates, deny wins.
//! No candidate means the file's `default` (deny unless the file says otherwise).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ident::{LabelKey, Labels, NameError, ServiceName};

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most rules (and most tests) in one file.
pub const MAX_RULES: usize = 10_000;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

/// Who a rule side matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    /// `"*"`: anything.
    Any,
    /// `"tag:key"` (label present) or `"tag:key=value"` on the node's labels.
    Tag(LabelKey, Option<String>),
    /// A service name.
    Service(ServiceName),
}

impl Selector {
    fn parse(s: &str) -> Result<Self, NameError> {
        if s == "*" {
            return Ok(Selector::Any);
        }
        if let Some(tag) = s.strip_prefix("tag:") {
            return Ok(match tag.split_once('=') {
                Some((k, v)) => Selector::Tag(LabelKey::new(k)?, Some(v.to_string())),
                None => Selector::Tag(LabelKey::new(tag)?, None),
            });
        }
        Ok(Selector::Service(ServiceName::new(s)?))
    }

    fn specificity(&self) -> u8 {
        match self {
            Selector::Any => 0,
            Selector::Tag(..) => 1,
            Selector::Service(_) => 2,
        }
    }

    fn matches(&self, service: &ServiceName, labels: &Labels) -> bool {
        match self {
            Selector::Any => true,
            Selector::Service(s) => s == service,
            Selector::Tag(k, v) => match (labels.get(k.as_str()), v) {
                (Some(_), None) => true,
                (Some(have), Some(want)) => have == want,
                (None, _) => false,
            },
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Any => f.write_str("*"),
            Selector::Tag(k, None) => write!(f, "tag:{k}"),
            Selector::Tag(k, Some(v)) => write!(f, "tag:{k}={v}"),
            Selector::Service(s) => write!(f, "{s}"),
        }
    }
}

/// One checked rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub from: Selector,
    pub to: Selector,
    pub action: Action,
    /// HTTP conditions (`methods`, `paths`, `headers`): the rule is about requests.
    pub http: Option<HttpMatch>,
}

/// A rule's HTTP conditions: every one given must hold for a request to match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HttpMatch {
    /// Methods (upper case); empty: any.
    pub methods: Vec<String>,
    /// Normalised paths, exact or prefix (`"/api/*"`); empty: any.
    pub paths: Vec<PathMatch>,
    /// Header names (lower case) with the exact value each must have.
    pub headers: Vec<(String, String)>,
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    /// Written `"/api/*"`: any path starting with `/api/`.
    Prefix(String),
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(p) => f.write_str(p),
            PathMatch::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Header names as servers fold them: case-insensitive, and every other byte than a
/// letter or digit as `-` (CGI and WSGI servers turn `x-tenant`, `x_tenant` and `x.tenant`
/// all into `HTTP_X_TENANT`).
pub fn same_header(a: &str, b: &str) -> bool {
    let fold = |c: u8| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            b'-'
        }
    };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

/// Headers some frameworks read as the request's method (a POST "overriding" to DELETE).
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

impl HttpMatch {
    /// Whether `req` meets every condition. For a deny (`wide`), whatever a server might
    /// take for the same thing matches too, so a deny can only err towards denying: paths
    /// in any case (some servers route case-insensitively), an exact path with a trailing
    /// slash (`/admin/` is `/admin` to many) and a prefix's bare path (`/admin/*` covers
    /// `/admin`, which routers mounted at `/admin` serve), HEAD where GET is named (servers
    /// answer HEAD with the GET handler), a method named in a method-override header,
    /// header names folded as servers fold them (any case, `_` as `-`) and header values in
    /// any case. An allow matches exactly: header names in any case only, values as written.
    fn matches(&self, req: &Request<'_>, wide: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if wide {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        let head = |x: &str| req.path.get(..x.len()).is_some_and(|h| eq(x, h));
        let name_eq = |a: &str, b: &str| {
            if wide {
                same_header(a, b)
            } else {
                a.eq_ignore_ascii_case(b)
            }
        };
        let overridden = |m: &str| {
            wide && req.headers.iter().any(|(n, v)| {
                METHOD_OVERRIDES.iter().any(|o| same_header(n, o))
                    && v.trim().eq_ignore_ascii_case(m)
            })
        };
        // An allow names the methods it allows: a request a framework would run as
        // another method (an override header naming one not listed) is not among them.
        let override_listed = || {
            req.headers
                .iter()
                .filter(|(n, _)| METHOD_OVERRIDES.iter().any(|o| same_header(n, o)))
                .all(|(_, v)| {
                    self.methods
                        .iter()
                        .any(|m| v.trim().eq_ignore_ascii_case(m))
                })
        };
        let method = |m: &String| {
            m == req.method || (wide && m == "GET" && req.method == "HEAD") || overridden(m)
        };
        if !wide && !self.methods.is_empty() && !override_listed() {
            return false;
        }
        let path = |p: &PathMatch| match p {
            PathMatch::Exact(x) => {
                eq(x, req.path)
                    || (wide && req.path.len() == x.len() + 1 && req.path.ends_with('/') && head(x))
            }
            PathMatch::Prefix(x) => {
                head(x) || (wide && x.len() > 1 && eq(&x[..x.len() - 1], req.path))
            }
        };
        (self.methods.is_empty() || self.methods.iter().any(method))
            && (self.paths.is_empty() || self.paths.iter().any(path))
            && self.headers.iter().all(|(name, value)| {
                req.headers
                    .iter()
                    .any(|(n, v)| name_eq(n, name) && eq(v.trim(), value))
            })
    }
}

/// An HTTP request as L7 policy judges it: its path normalised
/// ([`crate::http::normalize_path`]), its header names in any case.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
}

/// What is being judged.
#[derive(Debug, Clone, Copy)]
pub enum Traffic<'a> {
    /// Opaque bytes (an L4 flow, a packet): a rule with HTTP conditions cannot be checked,
    /// so an allow with them does not match and a deny with them does (fail closed).
    Opaque,
    /// An HTTP connection before its requests: admitted when some request could be
    /// allowed (an allow with HTTP conditions matches, a deny with them does not); each
    /// request is then judged as [`Traffic::Http`].
    HttpConnection,
    /// One HTTP request.
    Http(Request<'a>),
}

impl Rule {
    fn matches(&self, src: Source<'_>, dst: Destination<'_>, traffic: Traffic<'_>) -> bool {
        if !self.from.matches(src.service, src.labels) || !self.to.matches(dst.service, dst.labels)
        {
            return false;
        }
        match (&self.http, traffic) {
            (None, _) => true,
            (Some(_), Traffic::Opaque) => self.action == Action::Deny,
            (Some(_), Traffic::HttpConnection) => self.action == Action::Allow,
            (Some(h), Traffic::Http(req)) => h.matches(&req, self.action == Action::Deny),
        }
    }
}

/// One checked `[[test]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTest {
    pub from: ServiceName,
    pub to: ServiceName,
    pub expect: Action,
    /// A request to judge (`method`, `path`); `None`: an L4 flow.
    pub request: Option<(String, String)>,
}

/// A checked policy, ready to evaluate. Rule indexes are 0-based positions in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default: Action,
    pub rules: Vec<Rule>,
    pub tests: Vec<PolicyTest>,
}

impl Default for Policy {
    /// The empty policy: deny everything.
    fn default() -> Self {
        Self {
            default: Action::Deny,
            rules: Vec::new(),
            tests: Vec::new(),
        }
    }
}

/// What a node adds to its `Hello`'s agent version when it decodes policy layout 2 (rules
/// with HTTP conditions, tests with requests). A node without it is sent layout 1.
pub const POLICY_LAYOUT_2: &str = "policy=2";

/// Whether a node announcing `agent_version` decodes policy layout 2.
pub fn speaks_layout_2(agent_version: &str) -> bool {
    agent_version
        .split(';')
        .any(|p| p.trim() == POLICY_LAYOUT_2)
}

/// A policy as one node is sent it. Layout 1 (nodes from before HTTP rules) has no HTTP
/// conditions; such a node judges only opaque flows, so it is sent what the evaluator
/// decides for opaque traffic ([`Traffic::Opaque`]): a deny with HTTP conditions as a plain
/// deny, an allow with them left out, tests with requests left out. Its decisions are the
/// ones a current node makes on L4 flows; only its rule numbers may differ.
#[derive(Debug, Clone, Copy)]
pub struct PolicyWire<'a> {
    pub policy: &'a Policy,
    pub layout_2: bool,
}

impl Serialize for PolicyWire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        if self.layout_2 {
            return self.policy.serialize(s);
        }
        #[derive(Serialize)]
        #[serde(rename = "Rule")]
        struct Rule1<'a> {
            from: &'a Selector,
            to: &'a Selector,
            action: Action,
        }
        #[derive(Serialize)]
        #[serde(rename = "PolicyTest")]
        struct Test1<'a> {
            from: &'a ServiceName,
            to: &'a ServiceName,
            expect: Action,
        }
        struct Rules<'a>(&'a [Rule]);
        impl Serialize for Rules<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let keep = |r: &&Rule| r.http.is_none() || r.action == Action::Deny;
                let mut seq = s.serialize_seq(Some(self.0.iter().filter(keep).count()))?;
                for r in self.0.iter().filter(keep) {
                    seq.serialize_element(&Rule1 {
                        from: &r.from,
                        to: &r.to,
                        action: r.action,
                    })?;
                }
                seq.end()
            }
        }
        struct Tests<'a>(&'a [PolicyTest]);
        impl Serialize for Tests<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let keep = |t: &&PolicyTest| t.request.is_none();
                let mut seq = s.serialize_seq(Some(self.0.iter().filter(keep).count()))?;
                for t in self.0.iter().filter(keep) {
                    seq.serialize_element(&Test1 {
                        from: &t.from,
                        to: &t.to,
                        expect: t.expect,
                    })?;
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("Policy", 3)?;
        st.serialize_field("default", &self.policy.default)?;
        st.serialize_field("rules", &Rules(&self.policy.rules))?;
        st.serialize_field("tests", &Tests(&self.policy.tests))?;
        st.end()
    }
}

/// Why a policy file was refused. Rule and test indexes are 0-based, as in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    #[error("policy file is not valid toml: {0}")]
    Toml(String),
    #[error("default: must be \"allow\" or \"deny\", got {0:?}")]
    Default(String),
    #[error("rule[{index}].{field}: {reason}")]
    Rule {
        index: usize,
        field: &'static str,
        reason: String,
    },
    #[error("test[{index}].{field}: {reason}")]
    Test {
        index: usize,
        field: &'static str,
        reason: String,
    },
    #[error("too many {what} (at most {MAX_RULES})")]
    TooMany { what: &'static str },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default: Option<String>,
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    test: Vec<RawTest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: Option<String>,
    to: Option<String>,
    action: Option<String>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    headers: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Option<String>,
    to: Option<String>,
    expect: Option<String>,
    method: Option<String>,
    path: Option<String>,
}

/// Most methods, paths or headers in one rule.
const MAX_HTTP_CONDITIONS: usize = 64;

fn check_method(m: &str) -> Result<String, String> {
    if !crate::http::is_method(m) {
        return Err(format!(
            "{m:?} is not an HTTP method in upper case (GET, POST, ...)"
        ));
    }
    Ok(m.to_string())
}

fn check_path(p: &str) -> Result<PathMatch, String> {
    let (base, prefix) = match p.strip_suffix('*') {
        Some(b) => (b, true),
        None => (p, false),
    };
    if base.contains('*') {
        return Err(format!(
            "{p:?}: '*' stands only at the end, after a '/' (\"/api/*\")"
        ));
    }
    if prefix && !base.ends_with('/') {
        return Err(format!(
            "{p:?}: a prefix ends in \"/*\" (this one would match {base}istrator too): write \"{base}/*\", and \"{base}\" for the path itself"
        ));
    }
    let normal = crate::http::normalize_path(base).map_err(|e| format!("{p:?}: {e}"))?;
    if normal != base {
        return Err(format!(
            "{p:?} is not a normalised path (requests are judged normalised): write {:?}",
            if prefix { format!("{normal}*") } else { normal }
        ));
    }
    Ok(if prefix {
        PathMatch::Prefix(normal)
    } else {
        PathMatch::Exact(normal)
    })
}

fn check_header(name: &str, value: &str) -> Result<(String, String), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 128 || !name.bytes().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    if value.len() > 1024 || value.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "the value of {name:?} is too long or has control characters"
        ));
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

fn parse_http(r: &mut RawRule) -> Result<Option<HttpMatch>, (&'static str, String)> {
    if r.methods.is_none() && r.paths.is_none() && r.headers.is_none() {
        return Ok(None);
    }
    let too_many = |field| (field, format!("at most {MAX_HTTP_CONDITIONS}"));
    let methods = r.methods.take().unwrap_or_default();
    let paths = r.paths.take().unwrap_or_default();
    let headers = r.headers.take().unwrap_or_default();
    if methods.len() > MAX_HTTP_CONDITIONS {
        return Err(too_many("methods"));
    }
    if paths.len() > MAX_HTTP_CONDITIONS {
        return Err(too_many("paths"));
    }
    if headers.len() > MAX_HTTP_CONDITIONS {
        return Err(too_many("headers"));
    }
    Ok(Some(HttpMatch {
        methods: methods
            .iter()
            .map(|m| check_method(m))
            .collect::<Result<_, _>>()
            .map_err(|e| ("methods", e))?,
        paths: paths
            .iter()
            .map(|p| check_path(p))
            .collect::<Result<_, _>>()
            .map_err(|e| ("paths", e))?,
        headers: headers
            .iter()
            .map(|(n, v)| check_header(n, v))
            .collect::<Result<_, _>>()
            .map_err(|e| ("headers", e))?,
    }))
}

/// A TOML basic string with everything that needs it escaped.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_action(s: &str) -> Option<Action> {
    match s {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        _ => None,
    }
}

/// A source of traffic as the evaluator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub service: &'a ServiceName,
    pub labels: &'a Labels,
}

/// A destination as the evaluator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub service: &'a ServiceName,
    pub labels: &'a Labels,
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// A deny rule (index) matched with the highest specificity.
    Rule(usize),
    /// No rule matched and the default is deny.
    Default,
}

/// The outcome of evaluating a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Allowed by the rule at this index, or by an allow default (`None`).
    Allow(Option<usize>),
    Deny(DenyReason),
}

impl Decision {
    /// True for an allow.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
    /// The action taken.
    pub fn action(&self) -> Action {
        if self.is_allow() {
            Action::Allow
        } else {
            Action::Deny
        }
    }
    /// A short stable label for metrics and logs, e.g. `rule[2]` or `default`.
    pub fn rule_label(&self) -> String {
        match self {
            Decision::Allow(Some(i)) | Decision::Deny(DenyReason::Rule(i)) => format!("rule[{i}]"),
            Decision::Allow(None) | Decision::Deny(DenyReason::Default) => "default".into(),
        }
    }
}

/// A candidate rule considered while explaining a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub index: usize,
    pub rule: String,
    pub specificity: (u8, u8),
}

/// A decision with the reasoning behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub decision: Decision,
    pub candidates: Vec<Candidate>,
    pub text: String,
}

/// A `[[test]]` entry whose expectation did not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailure {
    pub index: usize,
    pub from: ServiceName,
    pub to: ServiceName,
    pub expect: Action,
    pub got: Explanation,
}

impl fmt::Display for TestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "test[{}]: {} -> {} expected {}, got {}: {}",
            self.index,
            self.from,
            self.to,
            self.expect,
            self.got.decision.action(),
            self.got.text
        )
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.action, self.from, self.to)
    }
}

impl Policy {
    /// Parses and checks a policy file.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge);
        }
        let raw: RawFile =
            toml::from_str(text).map_err(|e| PolicyError::Toml(e.message().to_string()))?;
        let default = match raw.default.as_deref() {
            None => Action::Deny,
            Some(s) => parse_action(s).ok_or_else(|| PolicyError::Default(s.to_string()))?,
        };
        if raw.rule.len() > MAX_RULES {
            return Err(PolicyError::TooMany { what: "rules" });
        }
        if raw.test.len() > MAX_RULES {
            return Err(PolicyError::TooMany { what: "tests" });
        }
        let mut rules = Vec::with_capacity(raw.rule.len());
        for (index, mut r) in raw.rule.into_iter().enumerate() {
            let err = |field, reason: String| PolicyError::Rule {
                index,
                field,
                reason,
            };
            let sel = |field, v: Option<String>| {
                let v = v.ok_or_else(|| err(field, "missing".into()))?;
                Selector::parse(&v).map_err(|e| err(field, e.to_string()))
            };
            let http = parse_http(&mut r).map_err(|(field, reason)| err(field, reason))?;
            let from = sel("from", r.from)?;
            let to = sel("to", r.to)?;
            let action = r.action.ok_or_else(|| err("action", "missing".into()))?;
            let action = parse_action(&action).ok_or_else(|| {
                err(
                    "action",
                    format!("must be \"allow\" or \"deny\", got {action:?}"),
                )
            })?;
            rules.push(Rule {
                from,
                to,
                action,
                http,
            });
        }
        let mut tests = Vec::with_capacity(raw.test.len());
        for (index, t) in raw.test.into_iter().enumerate() {
            let err = |field, reason: String| PolicyError::Test {
                index,
                field,
                reason,
            };
            let svc = |field, v: Option<String>| {
                let v = v.ok_or_else(|| err(field, "missing".into()))?;
                ServiceName::new(v).map_err(|e| err(field, e.to_string()))
            };
            let from = svc("from", t.from)?;
            let to = svc("to", t.to)?;
            let expect = t.expect.ok_or_else(|| err("expect", "missing".into()))?;
            let expect = parse_action(&expect).ok_or_else(|| {
                err(
                    "expect",
                    format!("must be \"allow\" or \"deny\", got {expect:?}"),
                )
            })?;
            let request = match (t.method, t.path) {
                (None, None) => None,
                (m, p) => {
                    let method = check_method(m.as_deref().unwrap_or("GET"))
                        .map_err(|e| err("method", e))?;
                    let (method, target) =
                        crate::http::parse_request(&method, p.as_deref().unwrap_or("/"))
                            .map_err(|e| err("path", e.to_string()))?;
                    Some((method, target.path))
                }
            };
            tests.push(PolicyTest {
                from,
                to,
                expect,
                request,
            });
        }
        Ok(Self {
            default,
            rules,
            tests,
        })
    }

    /// Renders the policy as a policy file that parses back to the same policy.
    pub fn to_toml(&self) -> String {
        let mut out = format!("default = {}\n", toml_str(&self.default.to_string()));
        let list = |items: Vec<String>| {
            let items: Vec<String> = items.iter().map(|i| toml_str(i)).collect();
            format!("[{}]", items.join(", "))
        };
        for r in &self.rules {
            out.push_str(&format!(
                "\n[[rule]]\nfrom = {}\nto = {}\naction = {}\n",
                toml_str(&r.from.to_string()),
                toml_str(&r.to.to_string()),
                toml_str(&r.action.to_string())
            ));
            if let Some(h) = &r.http {
                out.push_str(&format!("methods = {}\n", list(h.methods.clone())));
                out.push_str(&format!(
                    "paths = {}\n",
                    list(h.paths.iter().map(ToString::to_string).collect())
                ));
                let headers: Vec<String> = h
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{} = {}", toml_str(n), toml_str(v)))
                    .collect();
                out.push_str(&format!("headers = {{ {} }}\n", headers.join(", ")));
            }
        }
        for t in &self.tests {
            out.push_str(&format!(
                "\n[[test]]\nfrom = {}\nto = {}\nexpect = {}\n",
                toml_str(t.from.as_str()),
                toml_str(t.to.as_str()),
                toml_str(&t.expect.to_string())
            ));
            if let Some((m, p)) = &t.request {
                out.push_str(&format!(
                    "method = {}\npath = {}\n",
                    toml_str(m),
                    toml_str(p)
                ));
            }
        }
        out
    }

    /// Evaluates an L4 flow ([`Traffic::Opaque`]). Pure: same inputs, same answer.
    pub fn evaluate(&self, src: Source<'_>, dst: Destination<'_>) -> Decision {
        self.evaluate_traffic(src, dst, Traffic::Opaque)
    }

    /// Evaluates `traffic` from `src` to `dst`. Pure.
    pub fn evaluate_traffic(
        &self,
        src: Source<'_>,
        dst: Destination<'_>,
        traffic: Traffic<'_>,
    ) -> Decision {
        let mut best: Option<((u8, u8), usize, Action)> = None;
        for (i, r) in self.rules.iter().enumerate() {
            if !r.matches(src, dst, traffic) {
                continue;
            }
            let spec = (r.to.specificity(), r.from.specificity());
            best = match best {
                None => Some((spec, i, r.action)),
                Some((bs, _, _)) if spec > bs => Some((spec, i, r.action)),
                // Same specificity: the first deny wins over any allow.
                Some((bs, _, Action::Allow)) if spec == bs && r.action == Action::Deny => {
                    Some((spec, i, r.action))
                }
                keep => keep,
            };
        }
        match best {
            Some((_, i, Action::Allow)) => Decision::Allow(Some(i)),
            Some((_, i, Action::Deny)) => Decision::Deny(DenyReason::Rule(i)),
            None if self.default == Action::Allow => Decision::Allow(None),
            None => Decision::Deny(DenyReason::Default),
        }
    }

    /// The header names a request must carry once at most: those a rule matches on. A
    /// request repeating one is refused before it is judged (which of its values a
    /// service would read is anyone's guess).
    pub fn repeated_header<'a>(&self, req: &Request<'a>) -> Option<&'a str> {
        let named = |n: &str| {
            self.rules.iter().any(|r| {
                r.http
                    .as_ref()
                    .is_some_and(|h| h.headers.iter().any(|(m, _)| same_header(m, n)))
            })
        };
        req.headers.iter().enumerate().find_map(|(i, (n, _))| {
            (named(n) && req.headers[i + 1..].iter().any(|(m, _)| same_header(m, n))).then_some(*n)
        })
    }

    /// Evaluates an L4 flow and says why.
    pub fn explain(&self, src: Source<'_>, dst: Destination<'_>) -> Explanation {
        self.explain_traffic(src, dst, Traffic::Opaque)
    }

    /// Evaluates `traffic` and says why.
    pub fn explain_traffic(
        &self,
        src: Source<'_>,
        dst: Destination<'_>,
        traffic: Traffic<'_>,
    ) -> Explanation {
        let decision = self.evaluate_traffic(src, dst, traffic);
        let candidates: Vec<Candidate> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(src, dst, traffic))
            .map(|(index, r)| Candidate {
                index,
                rule: r.to_string(),
                specificity: (r.to.specificity(), r.from.specificity()),
            })
            .collect();
        let text = match decision {
            Decision::Allow(Some(i)) | Decision::Deny(DenyReason::Rule(i)) => {
                let others = candidates.len().saturating_sub(1);
                let rule = self
                    .rules
                    .get(i)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                if others == 0 {
                    format!("rule[{i}] ({rule}) is the only matching rule")
                } else {
                    format!("rule[{i}] ({rule}) is the most specific of {} matching rules (deny wins ties)", others + 1)
                }
            }
            Decision::Allow(None) => "no rule matches; default is allow".to_string(),
            Decision::Deny(DenyReason::Default) => "no rule matches; default is deny".to_string(),
        };
        Explanation {
            decision,
            candidates,
            text,
        }
    }

    /// Runs the file's `[[test]]` entries (services only, no labels); returns the failures.
    pub fn run_tests(&self) -> Vec<TestFailure> {
        let none = Labels::default();
        self.tests
            .iter()
            .enumerate()
            .filter_map(|(index, t)| {
                let traffic = match &t.request {
                    Some((method, path)) => Traffic::Http(Request {
                        method,
                        path,
                        headers: &[],
                    }),
                    None => Traffic::Opaque,
                };
                let got = self.explain_traffic(
                    Source {
                        service: &t.from,
                        labels: &none,
                    },
                    Destination {
                        service: &t.to,
                        labels: &none,
                    },
                    traffic,
                );
                (got.decision.action() != t.expect).then(|| TestFailure {
                    index,
                    from: t.from.clone(),
                    to: t.to.clone(),
                    expect: t.expect,
                    got,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn eval(p: &Policy, from: &str, to: &str, labels: &Labels) -> Decision {
        let (f, t) = (svc(from), svc(to));
        p.evaluate(
            Source {
                service: &f,
                labels,
            },
            Destination {
                service: &t,
                labels: &Labels::default(),
            },
        )
    }

    const DEMO: &str = r#"
default = "deny"
[[rule]]
from = "web"
to = "db"
action = "allow"
[[test]]
from = "web"
to = "payments"
expect = "deny"
[[test]]
from = "web"
to = "db"
expect = "allow"
"#;

    #[test]
    fn allowed_pair_and_its_denied_twin() {
        let p = Policy::parse(DEMO).unwrap();
        let none = Labels::default();
        assert_eq!(eval(&p, "web", "db", &none), Decision::Allow(Some(0)));
        assert_eq!(
            eval(&p, "web", "payments", &none),
            Decision::Deny(DenyReason::Default)
        );
        assert_eq!(
            eval(&p, "db", "web", &none),
            Decision::Deny(DenyReason::Default)
        );
        assert!(p.run_tests().is_empty());
    }

    #[test]
    fn deny_wins_ties_and_specific_beats_wildcard() {
        let p = Policy::parse(
            r#"
[[rule]]
from = "*"
to = "db"
action = "allow"
[[rule]]
from = "tag:env=dev"
to = "db"
action = "deny"
[[rule]]
from = "web"
to = "db"
action = "allow"
[[rule]]
from = "web"
to = "db"
action = "deny"
"#,
        )
        .unwrap();
        let dev = Labels::from_pairs([("env", "dev")]).unwrap();
        let prod = Labels::from_pairs([("env", "prod")]).unwrap();
        // web -> db: two equally specific rules, deny wins.
        assert_eq!(
            eval(&p, "web", "db", &prod),
            Decision::Deny(DenyReason::Rule(3))
        );
        // api from a dev node: the tag rule beats the wildcard.
        assert_eq!(
            eval(&p, "api", "db", &dev),
            Decision::Deny(DenyReason::Rule(1))
        );
        assert_eq!(eval(&p, "api", "db", &prod), Decision::Allow(Some(0)));
    }

    #[test]
    fn errors_name_the_rule_index_and_field() {
        let e = Policy::parse("[[rule]]\nfrom='web'\nto='db'\naction='allow'\n[[rule]]\nfrom='Web'\nto='db'\naction='allow'").unwrap_err();
        assert!(
            matches!(
                e,
                PolicyError::Rule {
                    index: 1,
                    field: "from",
                    ..
                }
            ),
            "{e}"
        );
        let e = Policy::parse("[[rule]]\nfrom='web'\nto='db'\naction='maybe'").unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule[0].action: must be \"allow\" or \"deny\", got \"maybe\""
        );
        let e = Policy::parse("[[rule]]\nfrom='web'\naction='allow'").unwrap_err();
        assert_eq!(e.to_string(), "rule[0].to: missing");
        let e = Policy::parse("[[test]]\nfrom='web'\nto='db'\nexpect='x'").unwrap_err();
        assert!(matches!(
            e,
            PolicyError::Test {
                index: 0,
                field: "expect",
                ..
            }
        ));
        assert!(matches!(
            Policy::parse("default='maybe'"),
            Err(PolicyError::Default(_))
        ));
        assert!(matches!(
            Policy::parse("bogus=1"),
            Err(PolicyError::Toml(_))
        ));
        assert!(matches!(
            Policy::parse("[[rule]]\nfrom='a'\nto='b'\naction='allow'\nport=3"),
            Err(PolicyError::Toml(_))
        ));
    }

    #[test]
    fn failing_tests_are_reported_with_the_rule() {
        let p = Policy::parse(
            "[[rule]]\nfrom='web'\nto='payments'\naction='allow'\n[[test]]\nfrom='web'\nto='payments'\nexpect='deny'",
        )
        .unwrap();
        let f = p.run_tests();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].index, 0);
        assert_eq!(f[0].got.decision, Decision::Allow(Some(0)));
        assert!(
            f[0].to_string().contains("expected deny, got allow"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn rendering_parses_back_to_the_same_policy() {
        let p = Policy::parse(&format!(
            "{DEMO}\n[[rule]]\nfrom = 'tag:env=a\"b'\nto = '*'\naction = 'deny'\n"
        ))
        .unwrap();
        assert_eq!(Policy::parse(&p.to_toml()).unwrap(), p);
    }

    #[test]
    fn explain_lists_candidates() {
        let p = Policy::parse(DEMO).unwrap();
        let none = Labels::default();
        let (w, d) = (svc("web"), svc("db"));
        let e = p.explain(
            Source {
                service: &w,
                labels: &none,
            },
            Destination {
                service: &d,
                labels: &none,
            },
        );
        assert_eq!(e.candidates.len(), 1);
        assert!(e.text.contains("rule[0]"), "{}", e.text);
        let pay = svc("payments");
        let e = p.explain(
            Source {
                service: &w,
                labels: &none,
            },
            Destination {
                service: &pay,
                labels: &none,
            },
        );
        assert_eq!(e.text, "no rule matches; default is deny");
    }

    const L7: &str = r#"
[[rule]]
from = "web"
to = "api"
action = "allow"
[[rule]]
from = "web"
to = "api"
action = "deny"
paths = ["/admin", "/admin/*"]
[[rule]]
from = "batch"
to = "api"
action = "allow"
methods = ["GET", "HEAD"]
paths = ["/reports/*"]
[[rule]]
from = "ops"
to = "api"
action = "allow"
headers = { "X-Tenant" = "blue" }
[[test]]
from = "web"
to = "api"
method = "GET"
path = "//admin"
expect = "deny"
[[test]]
from = "batch"
to = "api"
method = "GET"
path = "/reports/q1"
expect = "allow"
"#;

    fn judge(p: &Policy, from: &str, traffic: Traffic<'_>) -> Decision {
        let (f, t, none) = (svc(from), svc("api"), Labels::default());
        p.evaluate_traffic(
            Source {
                service: &f,
                labels: &none,
            },
            Destination {
                service: &t,
                labels: &none,
            },
            traffic,
        )
    }

    fn get<'a>(method: &'a str, path: &'a str) -> Traffic<'a> {
        Traffic::Http(Request {
            method,
            path,
            headers: &[],
        })
    }

    #[test]
    fn http_rules_judge_requests_by_method_and_normalised_path() {
        let p = Policy::parse(L7).unwrap();
        assert_eq!(
            judge(&p, "web", get("GET", "/public")),
            Decision::Allow(Some(0))
        );
        // Its denied twins: the path rule, whatever way the path was written.
        for raw in [
            "/admin",
            "/admin/users",
            "//admin",
            "/%61dmin",
            "/x/../admin/",
        ] {
            let path = crate::http::normalize_path(raw).unwrap();
            assert_eq!(
                judge(&p, "web", get("GET", &path)),
                Decision::Deny(DenyReason::Rule(1)),
                "{raw}"
            );
        }
        // `/administrator` is not under `/admin/`, nor is it `/admin`.
        assert_eq!(
            judge(&p, "web", get("GET", "/administrator")),
            Decision::Allow(Some(0))
        );
        assert_eq!(
            judge(&p, "batch", get("HEAD", "/reports/q1")),
            Decision::Allow(Some(2))
        );
        assert_eq!(
            judge(&p, "batch", get("POST", "/reports/q1")),
            Decision::Deny(DenyReason::Default),
            "a method the rule does not name"
        );
        assert_eq!(
            judge(&p, "batch", get("GET", "/reportsx")),
            Decision::Deny(DenyReason::Default)
        );
        let blue = [("x-tenant", "blue")];
        let red = [("x-tenant", "red")];
        let with = |headers| {
            Traffic::Http(Request {
                method: "GET",
                path: "/",
                headers,
            })
        };
        assert_eq!(judge(&p, "ops", with(&blue)), Decision::Allow(Some(3)));
        assert_eq!(
            judge(&p, "ops", with(&red)),
            Decision::Deny(DenyReason::Default)
        );
        assert!(p.run_tests().is_empty(), "{:?}", p.run_tests());
    }

    /// On bytes nobody can read as HTTP, a rule about requests cannot be checked: an allow
    /// with HTTP conditions allows nothing and a deny with them denies the flow. An HTTP
    /// connection is admitted when some request could be allowed.
    #[test]
    fn http_rules_fail_closed_on_opaque_flows_and_admit_connections_optimistically() {
        let p = Policy::parse(L7).unwrap();
        assert_eq!(
            judge(&p, "web", Traffic::Opaque),
            Decision::Deny(DenyReason::Rule(1))
        );
        assert_eq!(
            judge(&p, "batch", Traffic::Opaque),
            Decision::Deny(DenyReason::Default)
        );
        assert_eq!(
            judge(&p, "web", Traffic::HttpConnection),
            Decision::Allow(Some(0))
        );
        assert_eq!(
            judge(&p, "batch", Traffic::HttpConnection),
            Decision::Allow(Some(2))
        );
        assert_eq!(
            judge(&p, "stranger", Traffic::HttpConnection),
            Decision::Deny(DenyReason::Default)
        );
    }

    #[test]
    fn a_request_repeating_a_header_a_rule_matches_on_is_refused() {
        let p = Policy::parse(L7).unwrap();
        let twice = [("X-Tenant", "blue"), ("x-tenant", "red")];
        let req = Request {
            method: "GET",
            path: "/",
            headers: &twice,
        };
        assert_eq!(p.repeated_header(&req), Some("X-Tenant"));
        // Its twin: a header no rule names may repeat.
        let accept = [("accept", "a"), ("accept", "b"), ("x-tenant", "blue")];
        let req = Request {
            headers: &accept,
            ..req
        };
        assert_eq!(p.repeated_header(&req), None);
    }

    #[test]
    fn http_conditions_are_checked_when_the_file_is_read() {
        let rule = |extra: &str| {
            Policy::parse(&format!(
                "[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"allow\"\n{extra}\n"
            ))
        };
        let field = |r: Result<Policy, PolicyError>| match r {
            Err(PolicyError::Rule { field, reason, .. }) => (field, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(field(rule("methods = [\"get\"]")).0, "methods");
        let (f, why) = field(rule("paths = [\"/a/../b/*\"]"));
        assert_eq!(f, "paths");
        assert!(why.contains("\"/b/*\""), "{why}");
        assert_eq!(field(rule("paths = [\"/a%2Fb\"]")).0, "paths");
        assert_eq!(field(rule("paths = [\"admin\"]")).0, "paths");
        assert_eq!(
            field(rule("headers = { \"bad name\" = \"x\" }")).0,
            "headers"
        );
        // An unknown condition is refused, never ignored (a typo would widen an allow).
        assert!(matches!(
            rule("methods = [\"GET\"]\nhost = \"x\""),
            Err(PolicyError::Toml(m)) if m.contains("`host`")
        ));
    }

    #[test]
    fn http_rules_and_request_tests_survive_a_round_trip() {
        let p = Policy::parse(L7).unwrap();
        let again = Policy::parse(&p.to_toml()).unwrap();
        assert_eq!(again, p);
        assert_eq!(
            p.tests[0].request,
            Some(("GET".into(), "/admin".into())),
            "a test's path is normalised as a request's"
        );
    }

    /// A node from before HTTP rules decodes layout 1 (the old types, byte for byte) and
    /// is sent what a current node decides for opaque flows.
    #[test]
    fn a_node_from_before_http_rules_is_sent_the_policy_it_can_decode_and_enforce() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct OldRule {
            from: Selector,
            to: Selector,
            action: Action,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct OldTest {
            from: ServiceName,
            to: ServiceName,
            expect: Action,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct OldPolicy {
            default: Action,
            rules: Vec<OldRule>,
            tests: Vec<OldTest>,
        }
        let p = Policy::parse(L7).unwrap();
        let old = postcard::to_stdvec(&PolicyWire {
            policy: &p,
            layout_2: false,
        })
        .unwrap();
        let decoded: OldPolicy = postcard::from_bytes(&old).unwrap();
        let rule = |from: &str, action| OldRule {
            from: Selector::Service(svc(from)),
            to: Selector::Service(svc("api")),
            action,
        };
        assert_eq!(
            decoded,
            OldPolicy {
                default: Action::Deny,
                // The deny about /admin denies web's flows to api whole; the allows
                // with HTTP conditions are gone.
                rules: vec![rule("web", Action::Allow), rule("web", Action::Deny)],
                tests: Vec::new(),
            }
        );
        // Layout 2 is the policy itself.
        let new = postcard::to_stdvec(&PolicyWire {
            policy: &p,
            layout_2: true,
        })
        .unwrap();
        assert_eq!(new, postcard::to_stdvec(&p).unwrap());
        // The markers.
        assert!(speaks_layout_2("0.1.0; policy=2"));
        assert!(!speaks_layout_2("0.1.0"));
        assert!(!speaks_layout_2("0.1.0; policy=20"));
    }

    /// The review's ways around a deny: whatever a server may take for the denied thing
    /// is denied too (a deny errs towards denying); allows stay exact.
    #[test]
    fn a_deny_about_requests_covers_what_servers_take_for_the_same_request() {
        let p = Policy::parse(
            r#"
[[rule]]
from = "web"
to = "api"
action = "allow"
[[rule]]
from = "web"
to = "api"
action = "deny"
paths = ["/admin"]
[[rule]]
from = "web"
to = "api"
action = "deny"
methods = ["GET"]
paths = ["/secret/*"]
[[rule]]
from = "ops"
to = "api"
action = "allow"
paths = ["/ops/*"]
"#,
        )
        .unwrap();
        let denied = |method: &str, path: &str| !judge(&p, "web", get(method, path)).is_allow();
        assert!(denied("GET", "/ADMIN"), "case");
        assert!(
            denied("GET", "/admin/"),
            "a trailing slash on an exact path"
        );
        assert!(denied("HEAD", "/secret/x"), "HEAD where GET is denied");
        assert!(denied("GET", "/SECRET/x"));
        // The allowed twins.
        assert!(!denied("GET", "/admin/x"), "an exact deny is not a prefix");
        assert!(!denied("POST", "/secret/x"));
        assert!(!denied("GET", "/administrator"));
        // An allow stays exact: `/OPS/x` is not `/ops/x` to an allow.
        assert!(judge(&p, "ops", get("GET", "/ops/x")).is_allow());
        assert!(!judge(&p, "ops", get("GET", "/OPS/x")).is_allow());
    }

    #[test]
    fn header_names_fold_as_servers_fold_them_and_values_are_trimmed() {
        let p = Policy::parse(L7).unwrap();
        let folded = [("x-tenant", "blue"), ("X_Tenant", "red")];
        let req = Request {
            method: "GET",
            path: "/",
            headers: &folded,
        };
        assert_eq!(p.repeated_header(&req), Some("x-tenant"));
        let spaced = [("X-TENANT", " blue ")];
        let req = Request {
            headers: &spaced,
            ..req
        };
        assert!(judge(&p, "ops", Traffic::Http(req)).is_allow());
        // An allow is exact: `X_Tenant` is not a header most servers show as `x-tenant`.
        let underscored = [("X_Tenant", "blue")];
        let req = Request {
            headers: &underscored,
            ..req
        };
        assert!(!judge(&p, "ops", Traffic::Http(req)).is_allow());
    }

    #[test]
    fn an_allow_of_some_methods_does_not_allow_an_override_to_another() {
        let p = Policy::parse(
            "[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"allow\"\nmethods = [\"POST\"]\n",
        )
        .unwrap();
        let judged = |headers: &[(&str, &str)]| {
            let req = Request {
                method: "POST",
                path: "/items/7",
                headers,
            };
            judge(&p, "web", Traffic::Http(req)).is_allow()
        };
        assert!(judged(&[]), "the allowed twin");
        assert!(!judged(&[("X-HTTP-Method-Override", "DELETE")]));
        assert!(
            judged(&[("x-http-method-override", "post")]),
            "an override to a listed method"
        );
    }

    #[test]
    fn a_deny_covers_what_servers_take_for_it() {
        let p = Policy::parse(
            r#"
[[rule]]
from = "web"
to = "api"
action = "allow"
[[rule]]
from = "web"
to = "api"
action = "deny"
paths = ["/admin/*"]
[[rule]]
from = "web"
to = "api"
action = "deny"
methods = ["DELETE"]
[[rule]]
from = "web"
to = "api"
action = "deny"
headers = { x-role = "root" }
"#,
        )
        .unwrap();
        let judged = |method: &str, path: &str, headers: &[(&str, &str)]| {
            let req = Request {
                method,
                path,
                headers,
            };
            judge(&p, "web", Traffic::Http(req)).is_allow()
        };
        assert!(judged("GET", "/x", &[]), "the allowed twin");
        assert!(
            !judged("GET", "/admin", &[]),
            "a prefix's bare path (a router mounted there)"
        );
        assert!(!judged("GET", "/Admin", &[]));
        assert!(
            judged("GET", "/administrator", &[]),
            "not a segment of /admin"
        );
        assert!(
            !judged("POST", "/x", &[("X-HTTP-Method-Override", "delete")]),
            "method override"
        );
        assert!(!judged("POST", "/x", &[("x_method_override", "DELETE")]));
        assert!(judged("POST", "/x", &[("X-HTTP-Method-Override", "PUT")]));
        assert!(
            !judged("GET", "/x", &[("x.role", "root")]),
            "any separator folds"
        );
        assert!(
            !judged("GET", "/x", &[("X-Role", "Root")]),
            "values in any case"
        );
        assert!(
            !judged("GET", "/x", &[("x_role", "root")]),
            "names as servers fold them"
        );
        assert!(judged("GET", "/x", &[("x-role", "user")]));
    }

    #[test]
    fn path_patterns_that_could_never_match_or_match_too_much_are_refused() {
        for (pattern, says) in [
            ("/admin*", "/admin/*"),
            ("/a/*/b", "only at the end"),
            ("/a/**", "only at the end"),
            ("/x?y=1", "/x%3Fy=1"),
            ("/admin;v=1", "path parameter"),
            ("/admin#top", "fragment"),
        ] {
            let r = Policy::parse(&format!(
                "[[rule]]\nfrom = \"web\"\nto = \"api\"\naction = \"deny\"\npaths = [{pattern:?}]\n"
            ));
            match r {
                Err(PolicyError::Rule { field, reason, .. }) => {
                    assert_eq!(field, "paths");
                    assert!(reason.contains(says), "{pattern}: {reason}");
                }
                other => panic!("{pattern}: {other:?}"),
            }
        }
    }
}
