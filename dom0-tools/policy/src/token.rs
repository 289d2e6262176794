//! Qube tokens of the policy language and where each may stand.
//!
//! A token names one qube (`work`, `uuid:…`, `@adminvm`/`dom0`) or a set of
//! them (`@anyvm`, `*`, `@tag:X`, `@type:X`, `@dispvm`, `@dispvm:X`,
//! `@dispvm:@tag:X`, `@default`). As in Qubes' `qrexec/policy/parser.py`
//! (classes `Source`, `Target`, `Redirect`, `IntendedTarget` and the token
//! classes inheriting from them), each context accepts only some tokens:
//!
//! | token              | source | target | redirect (`target=`, `default_target=`) | intended target (request) |
//! |--------------------|:------:|:------:|:------:|:------:|
//! | name, `uuid:U`     | yes    | yes    | yes    | yes    |
//! | `@adminvm`, `dom0`, `uuid:00000000-…` | yes | yes | yes | yes |
//! | `*`                | yes    | yes    |        |        |
//! | `@anyvm`           | yes    | yes    |        |        |
//! | `@default`         |        | yes    |        | yes    |
//! | `@type:X`, `@tag:X`| yes    | yes    |        |        |
//! | `@dispvm`          |        | yes    | yes    | yes    |
//! | `@dispvm:X`        | yes    | yes    | yes    | yes    |
//! | `@dispvm:@tag:X`   | yes    | yes    |        |        |
//!
//! Parsing follows Python's order exactly (exact keywords first, then the
//! prefixes `@type:`, `@tag:`, `@dispvm:`, `@dispvm:@tag:`, an empty suffix
//! is `invalid empty PREFIX token`, anything else starting with `@` is
//! `invalid CONTEXT token`). `uuid:U` is the Qubes 4.3 way to name a qube
//! by uuid (qubes-core-qrexec PR #180: "using the syntax uuid:VM_UUID. This
//! works anywhere a VM name is expected"); it matches the qube whose
//! system-info `uuid` is `U`, and a request naming `uuid:U` as source or
//! target is that qube (a target keeps the `uuid:` form in replies).
//! `@adminvm`, `dom0` and `uuid:00000000-0000-0000-0000-000000000000` are
//! the admin VM everywhere ([`AdminForm`]; Python's `is_dom0`); `dom0` is
//! not rewritten to `@adminvm` (Qubes 4.3.8). `@dispvm:uuid:U` is the
//! disposable template with uuid `U`.
//!
//! Matching semantics (from the same classes' `match()` and `expand()`):
//! `@anyvm` matches everything except the admin VM — in particular it also
//! matches a request for `@default`, `@dispvm` and `@dispvm:X`; `@dispvm:X`
//! as a target also matches a request for `@dispvm` when the source's
//! `default_dispvm` is `X` (compared as text, as Qubes does, so
//! `@dispvm:uuid:U` does not; for a source without `default_dispvm` Qubes'
//! comparison fails, see [`TargetMatch::Fail`]); `@dispvm:@tag:T` matches `@dispvm:X` (or
//! `@dispvm` resolved through the source) when `X` is a disposable template
//! tagged `T`. This module never looks at rules or actions.

use crate::pyrepr::str_repr;
use crate::system_info::SystemInfo;

/// Where a token appears; decides which tokens are allowed and how an
/// invalid one is reported (`invalid source token: '…'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Third column of a rule.
    Source,
    /// Fourth column of a rule.
    Target,
    /// `target=` / `default_target=` parameters.
    Redirect,
    /// What the caller asked for.
    IntendedTarget,
}

impl Context {
    fn name(self) -> &'static str {
        match self {
            Context::Source => "source",
            Context::Target => "target",
            Context::Redirect => "redirect",
            Context::IntendedTarget => "intendedtarget",
        }
    }
}

/// A parsed token. Strings are kept exactly as written (after the prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Token {
    /// A qube by name.
    Name(Box<str>),
    /// `uuid:U`: a qube by uuid.
    Uuid(Box<str>),
    /// `*`: any qube, the admin VM included.
    Wildcard,
    /// `@anyvm`: any qube but the admin VM.
    AnyVm,
    /// The admin VM, as `@adminvm`, `dom0` or `uuid:00000000-…` (see
    /// [`AdminForm`]; the three match alike but expand differently).
    AdminVm(AdminForm),
    /// `@default`: the caller named no target.
    Default,
    /// `@dispvm`: a new disposable of the source's `default_dispvm`.
    DispVm,
    /// `@dispvm:X`: a new disposable based on `X`.
    DispVmTemplate(Box<str>),
    /// `@dispvm:@tag:T`: a disposable of any template tagged `T`.
    DispVmTag(Box<str>),
    /// `@tag:T`.
    Tag(Box<str>),
    /// `@type:T`.
    Type(Box<str>),
}

/// The uuid Qubes gives the admin VM (dom0) on every system.
pub const ADMIN_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// How the admin VM was written. Since Qubes 4.3.8 `dom0` is no longer
/// turned into `@adminvm`: all three forms name the admin VM when matching,
/// but a request keeps its form (`requested_target=dom0`), `@type:`/`@tag:`
/// rules match `dom0` and `uuid:0…` (qubes in the system info) but not the
/// keyword, and in `ask` choices the keyword expands to `@adminvm` while
/// the other two expand to the qube name `dom0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdminForm {
    /// `@adminvm`.
    Keyword,
    /// `dom0`.
    Name,
    /// `uuid:00000000-0000-0000-0000-000000000000`.
    Uuid,
}

impl AdminForm {
    /// The form as written.
    pub fn text(self) -> &'static str {
        match self {
            AdminForm::Keyword => "@adminvm",
            AdminForm::Name => "dom0",
            AdminForm::Uuid => "uuid:00000000-0000-0000-0000-000000000000",
        }
    }

    /// Which form `text` is, if it names the admin VM (Python's `is_dom0`).
    pub fn of(text: &str) -> Option<AdminForm> {
        match text {
            "@adminvm" => Some(AdminForm::Keyword),
            "dom0" => Some(AdminForm::Name),
            _ => text
                .strip_prefix("uuid:")
                .filter(|u| *u == ADMIN_UUID)
                .map(|_| AdminForm::Uuid),
        }
    }
}

/// A token that was not valid where it stood; the text is Python's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError(pub String);

const PREFIXES: [&str; 4] = ["@type:", "@tag:", "@dispvm:", "@dispvm:@tag:"];

fn allowed(context: Context, token: &Token) -> bool {
    use Context as C;
    match token {
        Token::Name(_) | Token::Uuid(_) | Token::AdminVm(_) => true,
        Token::Wildcard | Token::AnyVm | Token::Tag(_) | Token::Type(_) | Token::DispVmTag(_) => {
            matches!(context, C::Source | C::Target)
        }
        Token::Default => matches!(context, C::Target | C::IntendedTarget),
        Token::DispVm => matches!(context, C::Target | C::Redirect | C::IntendedTarget),
        Token::DispVmTemplate(_) => true,
    }
}

impl Token {
    /// Parse `text` as a token valid in `context`.
    pub fn parse(text: &str, context: Context) -> Result<Token, TokenError> {
        let token = text;
        if let Some(form) = AdminForm::of(token) {
            return Ok(Token::AdminVm(form));
        }
        if !(token.starts_with('@') || token == "*") {
            if let Some(uuid) = token.strip_prefix("uuid:") {
                if uuid.is_empty() {
                    return Err(TokenError(format!(
                        "invalid empty uuid: token: {}",
                        str_repr(text)
                    )));
                }
                return Ok(Token::Uuid(uuid.into()));
            }
            return Ok(Token::Name(token.into()));
        }
        let exact = match token {
            "*" => Some(Token::Wildcard),
            "@anyvm" => Some(Token::AnyVm),
            "@default" => Some(Token::Default),
            "@dispvm" => Some(Token::DispVm),
            _ => None,
        };
        if let Some(t) = exact
            && allowed(context, &t)
        {
            return Ok(t);
        }
        for prefix in PREFIXES {
            let Some(value) = token.strip_prefix(prefix) else {
                continue;
            };
            let candidate = match prefix {
                "@type:" => Token::Type(value.into()),
                "@tag:" => Token::Tag(value.into()),
                "@dispvm:" => Token::DispVmTemplate(value.into()),
                _ => Token::DispVmTag(value.into()),
            };
            if !allowed(context, &candidate) {
                continue;
            }
            if value.is_empty() {
                return Err(TokenError(format!(
                    "invalid empty {} token: {}",
                    prefix,
                    str_repr(token)
                )));
            }
            if value.starts_with('@') {
                continue;
            }
            return Ok(candidate);
        }
        Err(TokenError(format!(
            "invalid {} token: {}",
            context.name(),
            str_repr(text)
        )))
    }

    /// The token as written.
    pub fn text(&self) -> String {
        match self {
            Token::Name(n) => n.to_string(),
            Token::Uuid(u) => format!("uuid:{u}"),
            Token::Wildcard => "*".to_owned(),
            Token::AnyVm => "@anyvm".to_owned(),
            Token::AdminVm(form) => form.text().to_owned(),
            Token::Default => "@default".to_owned(),
            Token::DispVm => "@dispvm".to_owned(),
            Token::DispVmTemplate(x) => format!("@dispvm:{x}"),
            Token::DispVmTag(x) => format!("@dispvm:@tag:{x}"),
            Token::Tag(x) => format!("@tag:{x}"),
            Token::Type(x) => format!("@type:{x}"),
        }
    }

    /// Whether this source token matches the calling qube.
    pub fn matches_source(&self, source: &Source<'_>, system: &SystemInfo) -> bool {
        match self {
            Token::Wildcard => true,
            Token::AdminVm(_) => source.is_admin,
            Token::AnyVm => !source.is_admin,
            Token::Name(n) => !source.is_admin && **n == *source.name,
            Token::Uuid(u) => system
                .get(source.name)
                .and_then(|d| d.uuid.as_deref())
                .is_some_and(|x| x == &**u),
            Token::Type(t) => system.get(source.name).is_some_and(|d| d.vm_type == **t),
            Token::Tag(t) => system.get(source.name).is_some_and(|d| d.has_tag(t)),
            // Python compares these with the source *string*, which is a
            // qube name and so never a disposable keyword: they never match.
            Token::DispVmTemplate(_) | Token::DispVmTag(_) => false,
            Token::Default | Token::DispVm => false,
        }
    }

    /// Whether this target token matches the requested target (Python's
    /// `match()` of the target classes). For a `@dispvm:X` rule and a
    /// request for `@dispvm` from a qube without `default_dispvm` Qubes'
    /// comparison fails with an exception, which refuses the call; that case
    /// is [`TargetMatch::Fail`] here, and the caller must deny.
    pub fn match_target(
        &self,
        target: &IntendedTarget,
        source: &Source<'_>,
        system: &SystemInfo,
    ) -> TargetMatch {
        if let (Token::DispVmTemplate(_), IntendedTarget::DispVm) = (self, target)
            && source.default_dispvm(system).is_none()
        {
            return TargetMatch::Fail;
        }
        if self.matches_target(target, source, system) {
            TargetMatch::Yes
        } else {
            TargetMatch::No
        }
    }

    /// Whether this target token matches the requested target (the
    /// [`TargetMatch::Fail`] case counts as a match, so that a scan stops
    /// there).
    pub fn matches_target(
        &self,
        target: &IntendedTarget,
        source: &Source<'_>,
        system: &SystemInfo,
    ) -> bool {
        match self {
            Token::Wildcard => true,
            Token::AnyVm => !matches!(target, IntendedTarget::AdminVm(_)),
            Token::AdminVm(_) => matches!(target, IntendedTarget::AdminVm(_)),
            Token::Default => *target == IntendedTarget::Default,
            Token::DispVm => *target == IntendedTarget::DispVm,
            Token::Name(n) => matches!(target, IntendedTarget::Name { name, .. } if **name == **n),
            Token::Uuid(u) => match target {
                IntendedTarget::Name { name, .. } => system
                    .get(name)
                    .and_then(|d| d.uuid.as_deref())
                    .is_some_and(|x| x == &**u),
                _ => false,
            },
            Token::Type(ty) => target.domain(system).is_some_and(|d| d.vm_type == **ty),
            Token::Tag(tag) => target.domain(system).is_some_and(|d| d.has_tag(tag)),
            Token::DispVmTemplate(x) => match target {
                // Qubes compares the text `@dispvm:X` with
                // `@dispvm:DEFAULT_DISPVM`: a `uuid:` here never matches.
                // (no default_dispvm: the Fail case, see match_target)
                IntendedTarget::DispVm => source.default_dispvm(system).is_none_or(|d| d == &**x),
                IntendedTarget::DispVmTemplate { name, .. } => {
                    resolve_name(x, system).is_some_and(|n| n == &**name)
                }
                _ => false,
            },
            Token::DispVmTag(tag) => {
                let template = match target {
                    IntendedTarget::DispVm => source.default_dispvm(system),
                    IntendedTarget::DispVmTemplate { name, .. } => Some(&**name),
                    _ => None,
                };
                template
                    .and_then(|t| system.get(t))
                    .is_some_and(|d| d.template_for_dispvms && d.has_tag(tag))
            }
        }
    }

    /// Every concrete target this token stands for (Python's `expand()`
    /// followed by its uuid-to-name step), used to offer choices for `ask`.
    /// The admin VM comes out as `dom0`, disposables as `@dispvm` and
    /// `@dispvm:NAME`.
    /// `Err` names a `@dispvm:X` whose `X` is not a qube: Qubes fails on it
    /// (and so refuses the call), and so must the caller.
    pub fn expand(&self, system: &SystemInfo, out: &mut Vec<String>) -> Result<(), String> {
        match self {
            Token::Name(n) => {
                if system.contains(n) {
                    out.push(n.to_string());
                }
            }
            Token::Uuid(u) => {
                if let Some(n) = system.name_by_uuid(u) {
                    out.push(n.to_owned());
                }
            }
            // Qubes expands the keyword to itself and turns it into `dom0`
            // only after the deny rules were applied, so an earlier deny of
            // `dom0` (`*`, `dom0`, `@type:AdminVM`, …) does not cancel a
            // later `@adminvm` (qubes-core-qrexec parser.py:1898-1901); we
            // expand it to `dom0` at once, so that it does.
            Token::AdminVm(AdminForm::Keyword) => out.push("dom0".to_owned()),
            Token::AdminVm(AdminForm::Name | AdminForm::Uuid) => {
                if system.contains("dom0") {
                    out.push("dom0".to_owned());
                }
            }
            Token::Wildcard | Token::AnyVm => {
                let all = matches!(self, Token::Wildcard);
                for (name, domain) in system.iter() {
                    if all || name != "dom0" {
                        out.push(name.to_owned());
                    }
                    if domain.template_for_dispvms {
                        out.push(format!("@dispvm:{name}"));
                    }
                }
                out.push("@dispvm".to_owned());
            }
            Token::Default => {}
            Token::DispVm => out.push("@dispvm".to_owned()),
            Token::Type(t) => out.extend(
                system
                    .iter()
                    .filter(|(_, d)| d.vm_type == **t)
                    .map(|(n, _)| n.to_owned()),
            ),
            Token::Tag(t) => out.extend(
                system
                    .iter()
                    .filter(|(_, d)| d.has_tag(t))
                    .map(|(n, _)| n.to_owned()),
            ),
            Token::DispVmTemplate(x) => {
                let name = resolve_name(x, system).ok_or_else(|| {
                    format!("@dispvm:{x} names no qube, so the choices cannot be listed")
                })?;
                if system.get(name).is_some_and(|d| d.template_for_dispvms) {
                    out.push(format!("@dispvm:{name}"));
                }
            }
            Token::DispVmTag(t) => out.extend(
                system
                    .iter()
                    .filter(|(_, d)| d.has_tag(t) && d.template_for_dispvms)
                    .map(|(n, _)| format!("@dispvm:{n}")),
            ),
        }
        Ok(())
    }
}

/// The outcome of [`Token::match_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMatch {
    /// Does not match.
    No,
    /// Matches.
    Yes,
    /// Cannot be compared; the call must be refused.
    Fail,
}

/// `X` of `@dispvm:X` or of a request: a qube name, or `uuid:U` of a qube;
/// the name of the qube it is.
pub fn resolve_name<'s>(text: &str, system: &'s SystemInfo) -> Option<&'s str> {
    resolve_domain(text, system).map(|(n, _)| n)
}

/// [`resolve_name`], with the qube's entry.
pub fn resolve_domain<'s>(
    text: &str,
    system: &'s SystemInfo,
) -> Option<(&'s str, &'s crate::system_info::Domain)> {
    match text.strip_prefix("uuid:") {
        Some(u) => system.name_by_uuid(u).and_then(|n| system.get_key_value(n)),
        None => system.get_key_value(text),
    }
}

/// Python's `is_dom0`: whether `text` names the admin VM.
pub fn is_dom0(text: &str) -> bool {
    AdminForm::of(text).is_some()
}

/// The calling qube. The admin VM (`dom0`, `@adminvm` or dom0's uuid) is
/// recognised here, so that the admin VM source tokens match it and
/// `@anyvm` does not.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The qube name as qrexec-daemon gave it.
    pub name: &'a str,
    /// Whether this is the admin VM.
    pub is_admin: bool,
}

impl<'a> Source<'a> {
    /// Wrap a source name.
    pub fn new(name: &'a str) -> Self {
        Source {
            name,
            is_admin: is_dom0(name),
        }
    }

    /// The source's `default_dispvm`, if it has one.
    pub fn default_dispvm<'s>(&self, system: &'s SystemInfo) -> Option<&'s str> {
        system
            .get(self.name)
            .and_then(|d| d.default_dispvm.as_deref())
    }
}

/// The target the caller asked for, after Qubes' verification
/// (`IntendedTarget(...).verify(system_info)`). The text as the caller
/// wrote it is kept: Qubes answers with it (`requested_target=`, and
/// `target=` of an allow that was not redirected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntendedTarget {
    /// An existing qube other than the admin VM.
    Name {
        /// Its name.
        name: Box<str>,
        /// `U` if the caller wrote `uuid:U` (the reply keeps that form).
        uuid: Option<Box<str>>,
    },
    /// The admin VM, in the form the caller wrote.
    AdminVm(AdminForm),
    /// `@default` (empty, `@default`, or a qube that does not exist).
    Default,
    /// `@dispvm`.
    DispVm,
    /// `@dispvm:X` where `X` is a template for disposables.
    DispVmTemplate {
        /// The template's name.
        name: Box<str>,
        /// `X` as written: the name or `uuid:U`.
        text: Box<str>,
    },
}

/// Why a requested target is refused before any rule is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntendedTargetError {
    /// Not a token a caller may use (Python raises `PolicySyntaxError`
    /// with no file: `<unknown>:0: invalid intendedtarget token: '…'`).
    Syntax(String),
    /// `@dispvm:X` where `X` is not a template for disposables.
    NotDispVmTemplate(String),
}

impl IntendedTargetError {
    /// Whether Qubes tells the user about this denial: not for a malformed
    /// token (a `PolicySyntaxError`, logged as a policy error), yes for a
    /// `@dispvm:X` that is not a template.
    pub fn notify(&self) -> bool {
        matches!(self, IntendedTargetError::NotDispVmTemplate(_))
    }
}

impl std::fmt::Display for IntendedTargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntendedTargetError::Syntax(m) => write!(f, "<unknown>:0: {m}"),
            IntendedTargetError::NotDispVmTemplate(x) => {
                write!(f, "not a template for dispvm: {x}")
            }
        }
    }
}

impl IntendedTarget {
    /// Parse and verify what the caller asked for. An empty target is
    /// `@default`; a qube that does not exist becomes `@default` (as Qubes
    /// does, logging a warning — returned here as the flag).
    pub fn resolve(
        text: &str,
        system: &SystemInfo,
    ) -> Result<(IntendedTarget, bool), IntendedTargetError> {
        let text = if text.is_empty() { "@default" } else { text };
        let token = Token::parse(text, Context::IntendedTarget)
            .map_err(|e| IntendedTargetError::Syntax(e.0))?;
        Self::from_token(&token, system)
    }

    /// Verify a token from a redirect (`target=`) the same way.
    pub fn from_token(
        token: &Token,
        system: &SystemInfo,
    ) -> Result<(IntendedTarget, bool), IntendedTargetError> {
        Ok(match token {
            Token::Name(n) => {
                if system.contains(n) {
                    (
                        IntendedTarget::Name {
                            name: n.clone(),
                            uuid: None,
                        },
                        false,
                    )
                } else {
                    (IntendedTarget::Default, true)
                }
            }
            Token::Uuid(u) => match system.name_by_uuid(u) {
                Some(n) => (
                    IntendedTarget::Name {
                        name: n.into(),
                        uuid: Some(u.clone()),
                    },
                    false,
                ),
                None => (IntendedTarget::Default, true),
            },
            Token::AdminVm(form) => (IntendedTarget::AdminVm(*form), false),
            Token::Default => (IntendedTarget::Default, false),
            Token::DispVm => (IntendedTarget::DispVm, false),
            Token::DispVmTemplate(x) => match resolve_name(x, system) {
                Some(name) if system.get(name).is_some_and(|d| d.template_for_dispvms) => (
                    IntendedTarget::DispVmTemplate {
                        name: name.into(),
                        text: x.clone(),
                    },
                    false,
                ),
                _ => return Err(IntendedTargetError::NotDispVmTemplate(x.to_string())),
            },
            other => {
                return Err(IntendedTargetError::Syntax(format!(
                    "invalid intendedtarget token: {}",
                    str_repr(&other.text())
                )));
            }
        })
    }

    /// The text Qubes prints (`requested_target=` in the reply).
    pub fn text(&self) -> String {
        match self {
            IntendedTarget::Name {
                uuid: Some(uuid), ..
            } => format!("uuid:{uuid}"),
            IntendedTarget::Name { name, .. } => name.to_string(),
            IntendedTarget::AdminVm(form) => form.text().to_owned(),
            IntendedTarget::Default => "@default".to_owned(),
            IntendedTarget::DispVm => "@dispvm".to_owned(),
            IntendedTarget::DispVmTemplate { text, .. } => format!("@dispvm:{text}"),
        }
    }

    /// The qube's system-info entry, for `@type:`/`@tag:` rules: a qube
    /// named by name or uuid, and the admin VM unless written `@adminvm`
    /// (which, not being a qube name, has no entry in Qubes).
    pub fn domain<'s>(&self, system: &'s SystemInfo) -> Option<&'s crate::system_info::Domain> {
        match self {
            IntendedTarget::Name { name, .. } => system.get(name),
            IntendedTarget::AdminVm(AdminForm::Name | AdminForm::Uuid) => system.get("dom0"),
            _ => None,
        }
    }

    /// A qube named by name (for tests): `Name { name, uuid: None }`.
    pub fn name(name: &str) -> IntendedTarget {
        IntendedTarget::Name {
            name: name.into(),
            uuid: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system_info::Domain;

    fn system() -> SystemInfo {
        let mut dom0 = Domain::new("AdminVM");
        dom0.uuid = Some("00000000-0000-0000-0000-000000000000".into());
        let mut work = Domain::new("AppVM");
        work.tags = vec!["t1".into()];
        work.default_dispvm = Some("dvm".into());
        work.uuid = Some("w-uuid".into());
        let mut dvm = Domain::new("AppVM");
        dvm.template_for_dispvms = true;
        dvm.tags = vec!["dt".into()];
        let mut nodefault = Domain::new("AppVM");
        nodefault.default_dispvm = None;
        SystemInfo::new([
            ("dom0".to_owned(), dom0),
            ("work".to_owned(), work),
            ("dvm".to_owned(), dvm),
            ("nodefault".to_owned(), nodefault),
            ("tpl".to_owned(), Domain::new("TemplateVM")),
        ])
        .unwrap()
    }

    fn err(text: &str, c: Context) -> String {
        Token::parse(text, c).unwrap_err().0
    }

    #[test]
    fn parses_every_token() {
        use Context::*;
        assert_eq!(Token::parse("work", Source), Ok(Token::Name("work".into())));
        assert_eq!(
            Token::parse("dom0", Source),
            Ok(Token::AdminVm(AdminForm::Name))
        );
        assert_eq!(
            Token::parse("@adminvm", Redirect),
            Ok(Token::AdminVm(AdminForm::Keyword))
        );
        assert_eq!(
            Token::parse("uuid:abc", Target),
            Ok(Token::Uuid("abc".into()))
        );
        assert_eq!(Token::parse("*", Source), Ok(Token::Wildcard));
        assert_eq!(Token::parse("@anyvm", Target), Ok(Token::AnyVm));
        assert_eq!(Token::parse("@default", Target), Ok(Token::Default));
        assert_eq!(Token::parse("@dispvm", Target), Ok(Token::DispVm));
        assert_eq!(
            Token::parse("@dispvm:dvm", Redirect),
            Ok(Token::DispVmTemplate("dvm".into()))
        );
        assert_eq!(
            Token::parse("@dispvm:@tag:x", Target),
            Ok(Token::DispVmTag("x".into()))
        );
        assert_eq!(Token::parse("@tag:x", Source), Ok(Token::Tag("x".into())));
        assert_eq!(
            Token::parse("@type:AppVM", Target),
            Ok(Token::Type("AppVM".into()))
        );
    }

    #[test]
    fn context_errors_have_python_text() {
        use Context::*;
        assert_eq!(err("@default", Source), "invalid source token: '@default'");
        assert_eq!(err("@dispvm", Source), "invalid source token: '@dispvm'");
        assert_eq!(err("@anyvm", Redirect), "invalid redirect token: '@anyvm'");
        assert_eq!(err("@tag:x", Redirect), "invalid redirect token: '@tag:x'");
        assert_eq!(
            err("@dispvm:@tag:x", Redirect),
            "invalid redirect token: '@dispvm:@tag:x'"
        );
        assert_eq!(err("*", Redirect), "invalid redirect token: '*'");
        assert_eq!(err("@foo", Target), "invalid target token: '@foo'");
        assert_eq!(err("@tag:", Source), "invalid empty @tag: token: '@tag:'");
        assert_eq!(
            err("@type:", Target),
            "invalid empty @type: token: '@type:'"
        );
        assert_eq!(
            err("@dispvm:", Target),
            "invalid empty @dispvm: token: '@dispvm:'"
        );
        assert_eq!(
            err("@dispvm:@tag:", Target),
            "invalid empty @dispvm:@tag: token: '@dispvm:@tag:'"
        );
        assert_eq!(
            err("@dispvm:@x", Target),
            "invalid target token: '@dispvm:@x'"
        );
        assert_eq!(
            err("@anyvm", IntendedTarget),
            "invalid intendedtarget token: '@anyvm'"
        );
        assert_eq!(err("uuid:", Source), "invalid empty uuid: token: 'uuid:'");
    }

    #[test]
    fn anyvm_never_matches_adminvm() {
        let s = system();
        let src = Source::new("work");
        assert!(!Token::AnyVm.matches_target(
            &IntendedTarget::AdminVm(AdminForm::Keyword),
            &src,
            &s
        ));
        assert!(Token::AnyVm.matches_target(&IntendedTarget::Default, &src, &s));
        assert!(Token::AnyVm.matches_target(&IntendedTarget::DispVm, &src, &s));
        assert!(Token::Wildcard.matches_target(
            &IntendedTarget::AdminVm(AdminForm::Keyword),
            &src,
            &s
        ));
        assert!(!Token::AnyVm.matches_source(&Source::new("dom0"), &s));
        assert!(Token::AdminVm(AdminForm::Keyword).matches_source(&Source::new("dom0"), &s));
        assert!(Token::AnyVm.matches_source(&src, &s));
    }

    #[test]
    fn tag_type_uuid_match() {
        let s = system();
        let src = Source::new("work");
        let work = IntendedTarget::name("work");
        assert!(Token::Tag("t1".into()).matches_target(&work, &src, &s));
        assert!(!Token::Tag("t2".into()).matches_target(&work, &src, &s));
        assert!(Token::Type("AppVM".into()).matches_target(&work, &src, &s));
        assert!(Token::Uuid("w-uuid".into()).matches_target(&work, &src, &s));
        assert!(Token::Uuid("w-uuid".into()).matches_source(&src, &s));
        assert!(Token::Tag("t1".into()).matches_source(&src, &s));
        assert!(!Token::Type("AppVM".into()).matches_source(&Source::new("ghost"), &s));
    }

    #[test]
    fn dispvm_resolution_through_source() {
        let s = system();
        let src = Source::new("work");
        let t = Token::DispVmTemplate("dvm".into());
        assert!(t.matches_target(&IntendedTarget::DispVm, &src, &s));
        // Qubes fails comparing `@dispvm:X` with `@dispvm` from a qube with
        // no default_dispvm; that stops the scan and refuses the call
        assert_eq!(
            t.match_target(&IntendedTarget::DispVm, &Source::new("nodefault"), &s),
            TargetMatch::Fail
        );
        assert_eq!(
            Token::DispVmTemplate("other".into()).match_target(&IntendedTarget::DispVm, &src, &s),
            TargetMatch::No
        );
        assert!(t.matches_target(
            &IntendedTarget::DispVmTemplate {
                name: "dvm".into(),
                text: "dvm".into()
            },
            &src,
            &s
        ));
        let tag = Token::DispVmTag("dt".into());
        assert!(tag.matches_target(&IntendedTarget::DispVm, &src, &s));
        assert!(tag.matches_target(
            &IntendedTarget::DispVmTemplate {
                name: "dvm".into(),
                text: "dvm".into()
            },
            &src,
            &s
        ));
        assert!(!Token::DispVmTag("t1".into()).matches_target(&IntendedTarget::DispVm, &src, &s));
        assert!(!t.matches_source(&src, &s));
    }

    #[test]
    fn intended_target_verification() {
        let s = system();
        assert_eq!(
            IntendedTarget::resolve("", &s).unwrap(),
            (IntendedTarget::Default, false)
        );
        assert_eq!(
            IntendedTarget::resolve("dom0", &s).unwrap(),
            (IntendedTarget::AdminVm(AdminForm::Name), false)
        );
        assert_eq!(
            IntendedTarget::resolve("ghost", &s).unwrap(),
            (IntendedTarget::Default, true)
        );
        assert_eq!(
            IntendedTarget::resolve("uuid:w-uuid", &s).unwrap(),
            (
                IntendedTarget::Name {
                    name: "work".into(),
                    uuid: Some("w-uuid".into())
                },
                false
            )
        );
        assert_eq!(
            IntendedTarget::resolve("@dispvm:work", &s)
                .unwrap_err()
                .to_string(),
            "not a template for dispvm: work"
        );
        assert_eq!(
            IntendedTarget::resolve("@tag:x", &s)
                .unwrap_err()
                .to_string(),
            "<unknown>:0: invalid intendedtarget token: '@tag:x'"
        );
    }

    #[test]
    fn expansions() {
        let s = system();
        let mut v = Vec::new();
        Token::AnyVm.expand(&s, &mut v).unwrap();
        assert_eq!(
            v,
            ["dvm", "@dispvm:dvm", "nodefault", "tpl", "work", "@dispvm"].map(String::from)
        );
        assert!(v.contains(&"@dispvm:dvm".to_owned()));
        assert!(!v.contains(&"dom0".to_owned()));
        let mut w = Vec::new();
        Token::Wildcard.expand(&s, &mut w).unwrap();
        assert!(w.contains(&"dom0".to_owned()));
        let mut d = Vec::new();
        Token::DispVmTag("dt".into()).expand(&s, &mut d).unwrap();
        assert_eq!(d, vec!["@dispvm:dvm".to_owned()]);
    }
}
