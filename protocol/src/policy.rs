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
}

/// One checked `[[test]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTest {
    pub from: ServiceName,
    pub to: ServiceName,
    pub expect: Action,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Option<String>,
    to: Option<String>,
    expect: Option<String>,
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
        for (index, r) in raw.rule.into_iter().enumerate() {
            let err = |field, reason: String| PolicyError::Rule {
                index,
                field,
                reason,
            };
            let sel = |field, v: Option<String>| {
                let v = v.ok_or_else(|| err(field, "missing".into()))?;
                Selector::parse(&v).map_err(|e| err(field, e.to_string()))
            };
            let from = sel("from", r.from)?;
            let to = sel("to", r.to)?;
            let action = r.action.ok_or_else(|| err("action", "missing".into()))?;
            let action = parse_action(&action).ok_or_else(|| {
                err(
                    "action",
                    format!("must be \"allow\" or \"deny\", got {action:?}"),
                )
            })?;
            rules.push(Rule { from, to, action });
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
            tests.push(PolicyTest { from, to, expect });
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
        for r in &self.rules {
            out.push_str(&format!(
                "\n[[rule]]\nfrom = {}\nto = {}\naction = {}\n",
                toml_str(&r.from.to_string()),
                toml_str(&r.to.to_string()),
                toml_str(&r.action.to_string())
            ));
        }
        for t in &self.tests {
            out.push_str(&format!(
                "\n[[test]]\nfrom = {}\nto = {}\nexpect = {}\n",
                toml_str(t.from.as_str()),
                toml_str(t.to.as_str()),
                toml_str(&t.expect.to_string())
            ));
        }
        out
    }

    /// Evaluates a request. Pure: same inputs, same answer.
    pub fn evaluate(&self, src: Source<'_>, dst: Destination<'_>) -> Decision {
        let mut best: Option<((u8, u8), usize, Action)> = None;
        for (i, r) in self.rules.iter().enumerate() {
            if !r.from.matches(src.service, src.labels) || !r.to.matches(dst.service, dst.labels) {
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

    /// Evaluates a request and says why.
    pub fn explain(&self, src: Source<'_>, dst: Destination<'_>) -> Explanation {
        let decision = self.evaluate(src, dst);
        let candidates: Vec<Candidate> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                r.from.matches(src.service, src.labels) && r.to.matches(dst.service, dst.labels)
            })
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
                let got = self.explain(
                    Source {
                        service: &t.from,
                        labels: &none,
                    },
                    Destination {
                        service: &t.to,
                        labels: &none,
                    },
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
}
