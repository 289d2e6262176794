//! One policy line: service, argument, source, target, action, parameters.
//!
//! Parses both line formats, with Qubes' own checks in Qubes' own order and
//! with its error texts (from `qrexec/policy/parser.py`: `Rule.__init__`,
//! `Rule.from_line`, `Rule.from_line_service`, `validate_service_and_argument`):
//!
//! * current: `SERVICE ARGUMENT SOURCE TARGET ACTION [KEY=VALUE …]`, `*` for
//!   any service or argument, an argument otherwise starts with `+`;
//! * legacy (4.0, `/etc/qubes-rpc/policy/SERVICE[+ARG]`):
//!   `SOURCE TARGET ACTION[,KEY=VALUE…]` — `$` already replaced by `@` and
//!   commas by spaces by the caller, as Qubes does.
//!
//! Actions and their parameters: `deny [notify=]`,
//! `allow [target=] [user=] [notify=] [autostart=]`,
//! `ask [target=] [default_target=] [user=] [notify=] [autostart=]`;
//! `notify`/`autostart` take `yes` or `no`. A `@default` target with `allow`
//! must redirect (`target=`). One deliberate difference from Python: an
//! empty `target=`/`default_target=` value is an error here (Python accepts
//! it and then behaves as if the parameter were absent for `allow` but offers
//! an empty qube name for `ask`).
//!
//! This module parses and describes; it never evaluates a request.

use std::fmt;
use std::sync::Arc;

use crate::pyrepr::{char_tuple_repr, list_repr, str_repr};
use crate::token::{Context, Token};

/// Characters allowed in service names and arguments (Qubes'
/// `RPCNAME_ALLOWED_CHARSET`): ASCII letters, digits, `+-._`.
pub fn is_rpcname_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_')
}

/// A syntax error: `FILE:LINE: MESSAGE`, exactly as Qubes prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySyntaxError {
    /// The file (as given to the loader, resolved for includes).
    pub file: Arc<str>,
    /// 1-based line; 0 when the line is implicit.
    pub line: u32,
    /// Python's message text.
    pub message: String,
}

impl fmt::Display for PolicySyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for PolicySyntaxError {}

/// Where a rule came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File path as printed in messages.
    pub file: Arc<str>,
    /// 1-based line number, 0 for the implicit denies after a legacy
    /// `SERVICE+ARG` file.
    pub line: u32,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// What a matching rule says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `deny [notify=yes|no]` (notify defaults to yes).
    Deny {
        /// Tell the user about the refusal.
        notify: bool,
    },
    /// `allow [target=] [user=] [notify=] [autostart=]`.
    Allow {
        /// Redirect: the call goes there whatever was asked.
        target: Option<Token>,
        /// User to run the service as (`DEFAULT` when absent or empty).
        user: Option<String>,
        /// Tell the user about the call (default no).
        notify: bool,
        /// Start the target if it is not running (default yes).
        autostart: bool,
    },
    /// `ask [target=] [default_target=] [user=] [notify=] [autostart=]`.
    Ask {
        /// The only target offered.
        target: Option<Token>,
        /// Pre-selected choice.
        default_target: Option<Token>,
        /// User to run the service as.
        user: Option<String>,
        /// Tell the user about the call (default no).
        notify: bool,
        /// Start the target if it is not running (default yes).
        autostart: bool,
    },
}

impl Action {
    /// The redirect target, if any (Python's `action.target`).
    pub fn redirect(&self) -> Option<&Token> {
        match self {
            Action::Deny { .. } => None,
            Action::Allow { target, .. } | Action::Ask { target, .. } => target.as_ref(),
        }
    }

    /// Whether this is a deny.
    pub fn is_deny(&self) -> bool {
        matches!(self, Action::Deny { .. })
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Service name, `None` for `*`.
    pub service: Option<Box<str>>,
    /// Argument including the leading `+`, `None` for `*`.
    pub argument: Option<Box<str>>,
    /// Who may call.
    pub source: Token,
    /// What may be called.
    pub target: Token,
    /// What happens.
    pub action: Action,
    /// Where the rule was written.
    pub origin: Origin,
}

/// Python's `str.split()` separators: Unicode whitespace plus the ASCII
/// information separators `\x1c`–`\x1f`.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `line.split()` as Python does it.
pub fn py_split(line: &str) -> Vec<&str> {
    line.split(is_py_space).filter(|s| !s.is_empty()).collect()
}

/// `line.strip()` as Python does it.
pub fn py_strip(line: &str) -> &str {
    line.trim_matches(is_py_space)
}

fn invalid_chars(s: &str, allow_plus: bool) -> Vec<char> {
    let mut v: Vec<char> = s
        .chars()
        .filter(|&c| !(is_rpcname_char(c) && (allow_plus || c != '+')))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// A validated service and argument; `None` stands for `*`.
pub type ServiceAndArgument = (Option<Box<str>>, Option<Box<str>>);

/// Check a rule's (or `!include-service`'s) service and argument; `*` means
/// any and becomes `None`.
pub fn validate_service_and_argument(
    service: &str,
    argument: &str,
) -> Result<ServiceAndArgument, String> {
    let service = (service != "*").then_some(service);
    if let Some(s) = service {
        let bad = invalid_chars(s, false);
        if !bad.is_empty() {
            return Err(format!(
                "service {} contains invalid characters: {}",
                str_repr(s),
                char_tuple_repr(&bad)
            ));
        }
    }
    let argument = (argument != "*").then_some(argument);
    if let Some(a) = argument {
        let bad = invalid_chars(a, true);
        if !bad.is_empty() {
            return Err(format!(
                "argument {} contains invalid characters: {}",
                str_repr(a),
                char_tuple_repr(&bad)
            ));
        }
        if !a.starts_with('+') {
            return Err(format!("argument {} does not start with +", str_repr(a)));
        }
        if service.is_none() {
            return Err("only * argument allowed for * service".to_owned());
        }
    }
    Ok((service.map(Into::into), argument.map(Into::into)))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err(format!(
            "{} is {}, but can be only 'yes' or 'no'",
            str_repr(key),
            str_repr(value)
        )),
    }
}

fn parse_redirect(value: &str) -> Result<Token, String> {
    if value.is_empty() {
        return Err("invalid redirect token: ''".to_owned());
    }
    Token::parse(value, Context::Redirect).map_err(|e| e.0)
}

impl Rule {
    /// Build a rule from its fields, with every check Qubes makes.
    pub fn new(
        service: &str,
        argument: &str,
        source: &str,
        target: &str,
        action: &str,
        params: &[&str],
        origin: Origin,
    ) -> Result<Rule, PolicySyntaxError> {
        let fail = |message: String| PolicySyntaxError {
            file: Arc::clone(&origin.file),
            line: origin.line,
            message,
        };
        let (service, argument) = validate_service_and_argument(service, argument).map_err(fail)?;
        let source = Token::parse(source, Context::Source).map_err(|e| fail(e.0))?;
        let target = Token::parse(target, Context::Target).map_err(|e| fail(e.0))?;
        let (kind, allowed_keys): (&str, &[&str]) = match action {
            "allow" => ("Allow", &["target", "user", "notify", "autostart"]),
            "deny" => ("Deny", &["notify"]),
            "ask" => (
                "Ask",
                &["target", "default_target", "user", "notify", "autostart"],
            ),
            other => return Err(fail(format!("invalid action: {other}"))),
        };
        let mut kwds: Vec<(&str, &str)> = Vec::with_capacity(params.len());
        for param in params {
            let Some((key, value)) = param.split_once('=') else {
                return Err(fail(format!(
                    "invalid action parameter syntax: {}",
                    str_repr(param)
                )));
            };
            if kwds.iter().any(|(k, _)| *k == key) {
                return Err(fail(format!("parameter given twice: {}", str_repr(key))));
            }
            kwds.push((key, value));
        }
        let get = |key: &str| kwds.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let notify = get("notify")
            .map(|v| parse_bool("notify", v))
            .transpose()
            .map_err(fail)?;
        let autostart = get("autostart")
            .map(|v| parse_bool("autostart", v))
            .transpose()
            .map_err(fail)?;
        if kwds.iter().any(|(k, _)| !allowed_keys.contains(k)) {
            return Err(fail(format!(
                "invalid parameters for action {}: {}",
                kind,
                list_repr(params)
            )));
        }
        let user = get("user").filter(|u| !u.is_empty()).map(str::to_owned);
        let action = match kind {
            "Deny" => Action::Deny {
                notify: notify.unwrap_or(true),
            },
            "Allow" => Action::Allow {
                target: get("target")
                    .map(parse_redirect)
                    .transpose()
                    .map_err(fail)?,
                user,
                notify: notify.unwrap_or(false),
                autostart: autostart.unwrap_or(true),
            },
            _ => Action::Ask {
                target: get("target")
                    .map(parse_redirect)
                    .transpose()
                    .map_err(fail)?,
                default_target: get("default_target")
                    .map(parse_redirect)
                    .transpose()
                    .map_err(fail)?,
                user,
                notify: notify.unwrap_or(false),
                autostart: autostart.unwrap_or(true),
            },
        };
        if target == Token::Default && matches!(action, Action::Allow { target: None, .. }) {
            return Err(fail(
                "allow action for @default rule must specify target= option".to_owned(),
            ));
        }
        Ok(Rule {
            service,
            argument,
            source,
            target,
            action,
            origin,
        })
    }

    /// A current-format line (already stripped, not a comment/directive).
    pub fn from_line(line: &str, origin: Origin) -> Result<Rule, PolicySyntaxError> {
        let fields = py_split(line);
        match fields.as_slice() {
            [service, argument, source, target, action, params @ ..] => {
                Rule::new(service, argument, source, target, action, params, origin)
            }
            _ => Err(PolicySyntaxError {
                file: origin.file,
                line: origin.line,
                message: "wrong number of fields".to_owned(),
            }),
        }
    }

    /// A legacy line for `service`/`argument` (`$`→`@`, `,`→space already
    /// done by the caller).
    pub fn from_line_service(
        service: &str,
        argument: &str,
        line: &str,
        origin: Origin,
    ) -> Result<Rule, PolicySyntaxError> {
        let fields: Vec<&str> = py_split(line)
            .into_iter()
            .flat_map(|f| f.split(','))
            .collect();
        // Python splits source/target first, then the rest on commas; the
        // caller already turned commas into spaces, so one split suffices,
        // but commas inside the first two fields must stay (they cannot
        // occur after the substitution anyway).
        match fields.as_slice() {
            [source, target, action, params @ ..] => {
                Rule::new(service, argument, source, target, action, params, origin)
            }
            _ => Err(PolicySyntaxError {
                file: origin.file,
                line: origin.line,
                message: "wrong number of fields".to_owned(),
            }),
        }
    }

    /// Whether the rule applies to this service and argument.
    pub fn matches_service(&self, service: &str, argument: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.argument.as_deref().is_none_or(|a| a == argument)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // reason: test code indexes values it built itself.
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            file: "/etc/qubes/policy.d/30-user.policy".into(),
            line: 7,
        }
    }

    fn e(line: &str) -> String {
        Rule::from_line(line, origin()).unwrap_err().to_string()
    }

    fn ok(line: &str) -> Rule {
        Rule::from_line(line, origin()).unwrap()
    }

    const P: &str = "/etc/qubes/policy.d/30-user.policy:7: ";

    #[test]
    fn parses_actions_and_parameters() {
        let r = ok("qubes.Filecopy * work @anyvm ask default_target=vault user=u notify=yes");
        assert_eq!(r.service.as_deref(), Some("qubes.Filecopy"));
        assert_eq!(r.argument, None);
        assert_eq!(
            r.action,
            Action::Ask {
                target: None,
                default_target: Some(Token::Name("vault".into())),
                user: Some("u".into()),
                notify: true,
                autostart: true,
            }
        );
        let r = ok("qubes.Gpg +arg @tag:x @default allow target=vault autostart=no");
        assert_eq!(r.argument.as_deref(), Some("+arg"));
        assert_eq!(
            r.action,
            Action::Allow {
                target: Some(Token::Name("vault".into())),
                user: None,
                notify: false,
                autostart: false,
            }
        );
        assert_eq!(
            ok("* * @anyvm @anyvm deny").action,
            Action::Deny { notify: true }
        );
        assert_eq!(
            ok("* * @anyvm @anyvm deny notify=no").action,
            Action::Deny { notify: false }
        );
        assert_eq!(
            ok("a + @anyvm dom0 allow").target,
            Token::AdminVm(crate::token::AdminForm::Name)
        );
        assert_eq!(ok("a + @anyvm dom0 allow user=").action.redirect(), None);
    }

    #[test]
    fn error_texts_match_qubes() {
        assert_eq!(e("a b c d"), format!("{P}wrong number of fields"));
        assert_eq!(e("a * x y permit"), format!("{P}invalid action: permit"));
        assert_eq!(
            e("a$b * x y allow"),
            format!("{P}service 'a$b' contains invalid characters: ('$',)")
        );
        assert_eq!(
            e("a+b * x y allow"),
            format!("{P}service 'a+b' contains invalid characters: ('+',)")
        );
        assert_eq!(
            e("a +b%$ x y allow"),
            format!("{P}argument '+b%$' contains invalid characters: ('$', '%')")
        );
        assert_eq!(
            e("a b x y allow"),
            format!("{P}argument 'b' does not start with +")
        );
        assert_eq!(
            e("* +b x y allow"),
            format!("{P}only * argument allowed for * service")
        );
        assert_eq!(
            e("a * @default y allow"),
            format!("{P}invalid source token: '@default'")
        );
        assert_eq!(
            e("a * x @bad allow"),
            format!("{P}invalid target token: '@bad'")
        );
        assert_eq!(
            e("a * x y allow target"),
            format!("{P}invalid action parameter syntax: 'target'")
        );
        assert_eq!(
            e("a * x y allow user=a user=b"),
            format!("{P}parameter given twice: 'user'")
        );
        assert_eq!(
            e("a * x y allow notify=maybe"),
            format!("{P}'notify' is 'maybe', but can be only 'yes' or 'no'")
        );
        assert_eq!(
            e("a * x y allow autostart=1"),
            format!("{P}'autostart' is '1', but can be only 'yes' or 'no'")
        );
        assert_eq!(
            e("a * x y deny target=z"),
            format!("{P}invalid parameters for action Deny: ['target=z']")
        );
        assert_eq!(
            e("a * x y allow default_target=z"),
            format!("{P}invalid parameters for action Allow: ['default_target=z']")
        );
        assert_eq!(
            e("a * x y ask bogus=1 user=u"),
            format!("{P}invalid parameters for action Ask: ['bogus=1', 'user=u']")
        );
        assert_eq!(
            e("a * x y allow target=@anyvm"),
            format!("{P}invalid redirect token: '@anyvm'")
        );
        assert_eq!(
            e("a * x y ask default_target=@tag:t"),
            format!("{P}invalid redirect token: '@tag:t'")
        );
        assert_eq!(
            e("a * x y allow target="),
            format!("{P}invalid redirect token: ''")
        );
        assert_eq!(
            e("a * x @default allow"),
            format!("{P}allow action for @default rule must specify target= option")
        );
        // a trailing comment is not a comment
        assert_eq!(
            e("a * x y allow # note"),
            format!("{P}invalid action parameter syntax: '#'")
        );
    }

    #[test]
    fn default_target_with_ask_or_redirect_is_fine() {
        ok("a * x @default ask");
        ok("a * x @default allow target=dom0");
        ok("a * x @default deny");
    }

    #[test]
    fn legacy_lines() {
        let r = Rule::from_line_service(
            "qubes.Gpg",
            "*",
            "@anyvm @dispvm:dvm allow target=@dispvm:dvm",
            origin(),
        )
        .unwrap();
        assert_eq!(r.target, Token::DispVmTemplate("dvm".into()));
        assert_eq!(r.service.as_deref(), Some("qubes.Gpg"));
        assert_eq!(r.argument, None);
        let r = Rule::from_line_service("s", "+a", "work vault ask default_target=vault", origin())
            .unwrap();
        assert_eq!(r.argument.as_deref(), Some("+a"));
        assert_eq!(
            Rule::from_line_service("s", "*", "work vault", origin())
                .unwrap_err()
                .message,
            "wrong number of fields"
        );
        assert_eq!(
            Rule::from_line_service("s", "*", "work", origin())
                .unwrap_err()
                .message,
            "wrong number of fields"
        );
    }

    #[test]
    fn random_lines_never_panic() {
        const PIECES: [&str; 24] = [
            "*",
            "+",
            "+a",
            "a",
            "qubes.Gpg",
            "@anyvm",
            "@tag:",
            "@dispvm:",
            "@dispvm:@tag:x",
            "dom0",
            "uuid:",
            "allow",
            "deny",
            "ask",
            "target=",
            "target=@dispvm",
            "user=",
            "notify=yes",
            "autostart=",
            "=",
            "#",
            "\u{0}",
            "é",
            ",",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 9) as usize;
            let line: Vec<&str> = (0..n)
                .map(|i| PIECES[((x >> (i * 5)) % PIECES.len() as u64) as usize])
                .collect();
            let line = line.join(" ");
            let _ = Rule::from_line(&line, origin());
            let _ = Rule::from_line_service("s", "+a", &line, origin());
            let _ = Rule::from_line_service("*", "*", &line.replace(',', " "), origin());
        }
    }

    #[test]
    fn python_whitespace() {
        assert_eq!(py_split(" a\tb\u{1f}c  "), vec!["a", "b", "c"]);
        assert_eq!(py_strip("\u{1c} x \n"), "x");
    }
}
