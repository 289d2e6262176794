//! Deciding one call: first matching rule, then its action.
//!
//! Mirrors Qubes' `handle_request` (`qrexec/tools/qrexec_policy_exec.py`)
//! and the `Allow`/`Ask`/`Deny` actions and resolutions of
//! `qrexec/policy/parser.py`, with the same denial texts (they are logged as
//! `qrexec: SERVICE+ARG: SOURCE -> TARGET: denied: REASON`):
//!
//! * the requested target is verified first (empty → `@default`, a qube
//!   that does not exist → `@default` with a warning, `@dispvm:X` needs `X`
//!   to be a template for disposables; as since Qubes 4.3.8, `dom0`, its
//!   uuid `uuid:00000000-…` and `@adminvm` all name the admin VM but keep
//!   their form: `requested_target=dom0`); a malformed target is refused
//!   without `notify`, as Qubes' policy error is;
//! * `deny` → `denied by policy FILE:LINE`;
//! * `allow` → the target is the redirect (`target=`) if there is one,
//!   otherwise the requested target — **the action stands even if another
//!   rule would deny the redirected target**; `@default` then is an error,
//!   `@dispvm` becomes `@dispvm:DEFAULT_DISPVM` of the source, the admin
//!   VM in any form becomes `target=dom0`, other targets keep their text (a
//!   `uuid:` stays one) and come with `target_uuid=uuid:U` (or
//!   `@dispvm:uuid:U` of a disposable's template); `autostart=no` refuses
//!   targets that are not running; calling oneself is refused (`loopback
//!   qrexec connection not supported`) — also when the target names the
//!   caller by uuid, which Qubes, comparing texts, lets through;
//! * `ask` → the choices are the redirect alone, or every target some
//!   non-deny rule for this service/argument/source would reach minus those a
//!   later deny removes (Python's `collect_targets_for_ask`), the caller and
//!   `internal` qubes left out, `@adminvm` counted as `dom0` from the start
//!   (Qubes converts it only after the denies, so an earlier deny of dom0
//!   does not remove it there; see `tests/differential.rs`); the question
//!   goes to a [`Confirm`] implementation (the configured confirmation
//!   program); without one, `ask` is a deny and says so in the log.
//!   `assume_yes_for_ask` answers with the requested target; `just_evaluate`
//!   turns `allow` into a bare `result=allow` and `ask` into `result=deny`.
//!
//! A `default_target=` that is not among the choices is dropped with a
//! warning. Where Qubes' evaluation fails with an exception (a `@dispvm:X`
//! rule compared with `@dispvm` from a qube without `default_dispvm`, ask
//! choices naming a `@dispvm:X` that is no qube, an `ask` choice that is no
//! qube, a source not in the system info when choices are collected), the
//! call is refused here too. Evaluation never panics and never turns an
//! error into an allow.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::index::RuleIndex;
use crate::loader::{self, LoadedPolicy, PolicyError, PolicyPaths};
use crate::rule::{Action, Origin, Rule};
use crate::system_info::SystemInfo;
use crate::token::{
    AdminForm, IntendedTarget, Source, TargetMatch, Token, is_dom0, resolve_domain, resolve_name,
};

/// A policy question as the daemon socket or the command line asks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The calling qube.
    pub source: String,
    /// What the caller asked for (name, keyword or empty).
    pub intended_target: String,
    /// `SERVICE[+ARGUMENT]`.
    pub service_and_arg: String,
    /// Answer `ask` with the requested target.
    pub assume_yes_for_ask: bool,
    /// Only say whether the call would be allowed.
    pub just_evaluate: bool,
    /// The qube the call is made on behalf of (Qubes 4.3 `--source-qube`).
    pub requested_source: Option<String>,
}

/// The outcome of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run the service.
    Allow {
        /// User to run as (`None` = `DEFAULT`).
        user: Option<String>,
        /// Where: a qube name or `uuid:U` (as the request or redirect wrote
        /// it), `dom0`, or `@dispvm:X` (a new disposable).
        target: String,
        /// `uuid:U` of the target qube, or `@dispvm:uuid:U` of the
        /// disposable's template (none for dom0, or when the system info
        /// gives the qube no uuid).
        target_uuid: Option<String>,
        /// Start the target if needed.
        autostart: bool,
        /// The verified requested target (`@default`, `@adminvm`, …).
        requested_target: String,
    },
    /// `just_evaluate`: it would be allowed.
    AllowJustEvaluate,
    /// Refused, with the reason Qubes gives.
    Deny {
        /// Why (already logged).
        reason: String,
        /// Whether the user should be told.
        notify: bool,
    },
}

impl Decision {
    /// The reply bytes for the policy daemon socket and for
    /// `qrexec-policy-exec`'s standard output. Each line ends in `\n`;
    /// qrexec-daemon (`parse_policy_response` in qubes-core-qrexec
    /// `daemon/qrexec-daemon.c`) strips one trailing newline, splits on
    /// `\n`, requires `user`, `target`, `requested_target` and `autostart`
    /// with `result=allow` and forbids them with `result=deny`, and reads at
    /// most 4096 bytes. (Python's daemon omits the final newline of an allow;
    /// both forms parse the same.)
    pub fn reply(&self) -> String {
        match self {
            Decision::Allow {
                user,
                target,
                target_uuid,
                autostart,
                requested_target,
            } => {
                let uuid_line = match target_uuid {
                    Some(u) => format!("target_uuid={u}\n"),
                    None => String::new(),
                };
                format!(
                    "user={}\nresult=allow\ntarget={}\n{}autostart={}\nrequested_target={}\n",
                    user.as_deref().unwrap_or("DEFAULT"),
                    target,
                    uuid_line,
                    if *autostart { "True" } else { "False" },
                    requested_target
                )
            }
            Decision::AllowJustEvaluate => "result=allow\n".to_owned(),
            Decision::Deny { .. } => "result=deny\n".to_owned(),
        }
    }

    /// Whether the call goes ahead.
    pub fn is_allow(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }
}

/// What the user is asked for an `ask` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskQuestion {
    /// The calling qube.
    pub source: String,
    /// Service name.
    pub service: String,
    /// Argument, with its `+`.
    pub argument: String,
    /// Choices, sorted.
    pub targets: Vec<String>,
    /// Pre-selected choice.
    pub default_target: Option<String>,
}

/// The user's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskAnswer {
    /// Allowed, to this target.
    Allow(String),
    /// Refused.
    Deny,
    /// Something that is neither (logged, then denied).
    Invalid(String),
    /// Nobody could be asked (no program, it failed, it timed out).
    Unavailable(String),
}

/// What the user is told about a decision of a rule with `notify=yes` (or
/// a denial Qubes notifies): Qubes' `policy.Notify` parameters.
/// Borrowed from the query and the decision: nothing is copied unless the
/// [`Confirm`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice<'a> {
    /// `true` for `"resolution": "allow"`, `false` for `"deny"`.
    pub allowed: bool,
    /// Service name.
    pub service: &'a str,
    /// Argument, with its `+`.
    pub argument: &'a str,
    /// The calling qube.
    pub source: &'a str,
    /// The chosen target (allow) or the intended target (deny).
    pub target: &'a str,
}

/// Who answers `ask`.
pub trait Confirm: Send + Sync {
    /// Ask the user.
    fn confirm(&self, question: &AskQuestion) -> AskAnswer;

    /// Tell the user (`policy.Notify`); failures are only logged. Called
    /// for an allow by a rule with `notify=yes` and for a notifying denial,
    /// never for `just_evaluate`.
    fn notify(&self, _notice: &Notice<'_>) {}
}

/// No confirmation program: every `ask` is a deny.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConfirm;

impl Confirm for NoConfirm {
    fn confirm(&self, _question: &AskQuestion) -> AskAnswer {
        AskAnswer::Unavailable("no confirmation program is configured".to_owned())
    }
}

/// A loaded, compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    index: RuleIndex,
    inputs: Vec<PathBuf>,
}

/// A verified request.
struct Request<'q> {
    service: &'q str,
    argument: &'q str,
    source: Source<'q>,
    target: IntendedTarget,
}

struct Denial {
    reason: String,
    notify: bool,
}

fn deny(reason: impl Into<String>) -> Denial {
    Denial {
        reason: reason.into(),
        notify: true,
    }
}

impl Policy {
    /// Load and compile from disk.
    pub fn load(paths: &PolicyPaths) -> Result<Policy, PolicyError> {
        Ok(Policy::from_loaded(loader::load(paths)?))
    }

    /// Load and compile a policy tree installed under `root` (see
    /// [`loader::load_under`]).
    pub fn load_under(paths: &PolicyPaths, root: &std::path::Path) -> Result<Policy, PolicyError> {
        Ok(Policy::from_loaded(loader::load_under(paths, root)?))
    }

    /// Compile loaded rules.
    pub fn from_loaded(loaded: LoadedPolicy) -> Policy {
        let index = RuleIndex::build(&loaded.rules);
        Policy {
            rules: loaded.rules,
            index,
            inputs: loaded.inputs,
        }
    }

    /// Compile rules.
    pub fn from_rules(rules: Vec<Rule>) -> Policy {
        Policy::from_loaded(LoadedPolicy {
            rules,
            inputs: Vec::new(),
        })
    }

    /// Rules in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Files and directories the load read (what a watcher should stat).
    pub fn inputs(&self) -> &[PathBuf] {
        &self.inputs
    }

    /// Index statistics: number of distinct rule keys.
    pub fn index_buckets(&self) -> usize {
        self.index.bucket_count()
    }

    fn rule_matches(rule: &Rule, request: &Request<'_>, system: &SystemInfo) -> bool {
        rule.matches_service(request.service, request.argument)
            && rule.source.matches_source(&request.source, system)
            && rule
                .target
                .matches_target(&request.target, &request.source, system)
    }

    fn find(&self, request: &Request<'_>, system: &SystemInfo, indexed: bool) -> Option<usize> {
        if indexed {
            self.index.first_match(
                request.service,
                request.argument,
                &request.source,
                &request.target,
                |n| {
                    self.rules
                        .get(n)
                        .is_some_and(|r| Self::rule_matches(r, request, system))
                },
            )
        } else {
            self.rules
                .iter()
                .position(|r| Self::rule_matches(r, request, system))
        }
    }

    /// The first matching rule number for a raw request, through the index
    /// (`None` if the target does not verify or nothing matches).
    pub fn find_rule(
        &self,
        service_and_arg: &str,
        source: &str,
        intended_target: &str,
        system: &SystemInfo,
        indexed: bool,
    ) -> Option<usize> {
        let (service, argument) = split_service(service_and_arg);
        let (target, _) = IntendedTarget::resolve(intended_target, system).ok()?;
        let request = Request {
            service,
            argument,
            source: Source::new(source_name(source, system)),
            target,
        };
        self.find(&request, system, indexed)
    }

    /// Decide `query` (through the index).
    pub fn evaluate(&self, query: &Query, system: &SystemInfo, confirm: &dyn Confirm) -> Decision {
        self.evaluate_with(query, system, confirm, true)
    }

    /// Decide `query` with a plain linear scan (the reference the index is
    /// tested against).
    pub fn evaluate_linear(
        &self,
        query: &Query,
        system: &SystemInfo,
        confirm: &dyn Confirm,
    ) -> Decision {
        self.evaluate_with(query, system, confirm, false)
    }

    fn evaluate_with(
        &self,
        query: &Query,
        system: &SystemInfo,
        confirm: &dyn Confirm,
        indexed: bool,
    ) -> Decision {
        let prefix = || {
            format!(
                "qrexec: {}: {} -> {}:",
                printable(&query.service_and_arg),
                printable(&query.source),
                printable(&query.intended_target)
            )
        };
        match self.decide(query, system, confirm, indexed) {
            Ok(decision) => {
                if let Decision::Allow { target, .. } = &decision
                    && log::log_enabled!(log::Level::Info)
                {
                    log::info!("{} allowed to {target}", prefix());
                }
                decision
            }
            Err(denial) => {
                if log::log_enabled!(log::Level::Info) {
                    log::info!("{} denied: {}", prefix(), printable(&denial.reason));
                }
                if denial.notify && !query.just_evaluate {
                    let (service, argument) = split_service(&query.service_and_arg);
                    confirm.notify(&Notice {
                        allowed: false,
                        service,
                        argument,
                        source: &query.source,
                        target: &query.intended_target,
                    });
                }
                Decision::Deny {
                    reason: denial.reason,
                    notify: denial.notify,
                }
            }
        }
    }

    fn decide<'a>(
        &self,
        query: &'a Query,
        system: &'a SystemInfo,
        confirm: &dyn Confirm,
        indexed: bool,
    ) -> Result<Decision, Denial> {
        // An empty requested_source (Qubes' 4.4 daemon sends one for a
        // MSG_TRIGGER_SERVICE4 without --source-qube) means none, as in
        // Qubes' policy.
        if let Some(requested) = &query.requested_source
            && !requested.is_empty()
            && *requested != query.source
        {
            return Err(deny(format!(
                "requested_source={requested} differs from the source; evaluating calls on behalf of another qube is not supported"
            )));
        }
        let (service, argument) = split_service(&query.service_and_arg);
        if service.is_empty() {
            return Err(deny("empty service name"));
        }
        let (target, substituted) = IntendedTarget::resolve(&query.intended_target, system)
            .map_err(|e| Denial {
                reason: e.to_string(),
                notify: e.notify(),
            })?;
        if substituted {
            log::warn!(
                "qrexec: target {} does not exist, using @default instead",
                crate::pyrepr::str_repr(&query.intended_target)
            );
        }
        let request = Request {
            service,
            argument,
            source: Source::new(source_name(&query.source, system)),
            target,
        };
        let number = self
            .find(&request, system, indexed)
            .ok_or_else(|| deny("no matching rule found"))?;
        let rule = self
            .rules
            .get(number)
            .ok_or_else(|| deny("no matching rule found"))?;
        if rule
            .target
            .match_target(&request.target, &request.source, system)
            == TargetMatch::Fail
        {
            return Err(deny(format!(
                "rule at {} names {} as target, but {} has no default_dispvm to compare the requested @dispvm with",
                rule.origin,
                rule.target.text(),
                printable(request.source.name)
            )));
        }
        match &rule.action {
            Action::Deny { notify } => Err(Denial {
                reason: format!("denied by policy {}", rule.origin),
                notify: *notify,
            }),
            Action::Allow {
                target,
                user,
                notify,
                autostart,
            } => {
                let resolved = allow_target(target.as_ref(), &request, system, &rule.origin)
                    .map_err(|reason| Denial {
                        reason,
                        notify: true,
                    })?;
                if !*autostart && !allow_no_autostart(&resolved, system) {
                    return Err(Denial {
                        reason: format!(
                            "target {resolved} is denied because it would require autostart"
                        ),
                        notify: *notify,
                    });
                }
                let decision =
                    finish_allow(system, query, &request, user.clone(), resolved, *autostart);
                notify_allow(confirm, query, *notify, decision)
            }
            Action::Ask {
                target,
                default_target,
                user,
                notify,
                autostart,
            } => {
                let mut targets: Vec<String> = match target {
                    // the admin VM is offered as `dom0`; any other redirect
                    // is offered as written (a uuid stays a uuid)
                    Some(Token::AdminVm(_)) => vec!["dom0".to_owned()],
                    Some(t) => vec![t.text()],
                    None => self
                        .collect_targets_for_ask(&request, system, indexed)
                        .map_err(|why| {
                            deny(format!(
                                "policy define 'ask' action at {} but {why}",
                                rule.origin
                            ))
                        })?,
                };
                if !*autostart {
                    targets.retain(|t| allow_no_autostart(t, system));
                }
                if targets.is_empty() {
                    return Err(deny(format!(
                        "policy define 'ask' action at {} but no target is available to choose from",
                        rule.origin
                    )));
                }
                let default = default_target
                    .as_ref()
                    .and_then(|d| ask_default(d, &request, system))
                    .and_then(|d| {
                        if targets.contains(&d) {
                            Some(d)
                        } else {
                            log::warn!(
                                "{}: default_target={d} is not among the choices; offering no default",
                                rule.origin
                            );
                            None
                        }
                    });
                let choice = if query.assume_yes_for_ask {
                    request.target.text()
                } else if query.just_evaluate {
                    return Err(deny("ask action with just_evaluate"));
                } else {
                    let question = AskQuestion {
                        source: query.source.clone(),
                        service: service.to_owned(),
                        argument: argument.to_owned(),
                        targets: targets.clone(),
                        default_target: default,
                    };
                    match confirm.confirm(&question) {
                        AskAnswer::Allow(t) => t,
                        AskAnswer::Deny => {
                            return Err(Denial {
                                reason: format!("denied by the user {}", rule.origin),
                                notify: *notify,
                            });
                        }
                        AskAnswer::Invalid(answer) => {
                            log::error!(
                                "invalid ask response for {}: {}",
                                printable(service),
                                printable(&answer)
                            );
                            return Err(deny("invalid response"));
                        }
                        AskAnswer::Unavailable(why) => {
                            log::error!(
                                "{} from {}: the resolution was \"ask\" ({}), but {why}; denying",
                                printable(service),
                                printable(&query.source),
                                rule.origin
                            );
                            return Err(deny(format!(
                                "policy define 'ask' action at {} but {why}",
                                rule.origin
                            )));
                        }
                    }
                };
                if !targets.contains(&choice) {
                    return Err(deny(format!("target {choice} is not a valid choice")));
                }
                let decision =
                    finish_allow(system, query, &request, user.clone(), choice, *autostart);
                notify_allow(confirm, query, *notify, decision)
            }
        }
    }

    /// Python's `collect_targets_for_ask`: walk the rules backwards, add
    /// what non-deny rules reach, remove what deny rules reach.
    fn collect_targets_for_ask(
        &self,
        request: &Request<'_>,
        system: &SystemInfo,
        indexed: bool,
    ) -> Result<Vec<String>, String> {
        if !system.contains(request.source.name) {
            return Err(format!(
                "the source {} is not in the system info",
                printable(request.source.name)
            ));
        }
        let mut targets: BTreeSet<String> = BTreeSet::new();
        let mut expansion = Vec::new();
        let candidates: Vec<usize> = if indexed {
            self.index
                .candidates_but_target(request.service, request.argument, &request.source)
        } else {
            (0..self.rules.len()).collect()
        };
        for rule in candidates
            .iter()
            .rev()
            .filter_map(|&number| self.rules.get(number))
        {
            if !(rule.matches_service(request.service, request.argument)
                && rule.source.matches_source(&request.source, system))
            {
                continue;
            }
            expansion.clear();
            rule.action
                .redirect()
                .unwrap_or(&rule.target)
                .expand(system, &mut expansion)
                .map_err(|why| format!("{why} ({})", rule.origin))?;
            if rule.action.is_deny() {
                for t in &expansion {
                    targets.remove(t);
                }
            } else {
                targets.extend(expansion.drain(..));
            }
        }
        if targets.remove("@dispvm")
            && let Some(d) = request.source.default_dispvm(system)
        {
            targets.insert(format!("@dispvm:{d}"));
        }
        if targets.remove("@adminvm") {
            targets.insert("dom0".to_owned());
        }
        targets.remove(request.source.name);
        // internal qubes (and disposables of internal templates) are never
        // offered from the rules
        if system.any_internal() {
            targets.retain(|t| {
                let name = t.strip_prefix("@dispvm:").unwrap_or(t);
                !system.get(name).is_some_and(|d| d.internal)
            });
        }
        Ok(targets.into_iter().collect())
    }
}

/// Request text made safe for a log line: control characters (which could
/// forge log lines) are shown escaped.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    crate::logger::escape_controls(text)
}

/// A source given as `uuid:U` (Qubes 4.3) is the qube with that uuid;
/// an unknown uuid stays as written (and so matches only `*`/`@anyvm`).
fn source_name<'a>(source: &'a str, system: &'a SystemInfo) -> &'a str {
    source
        .strip_prefix("uuid:")
        .and_then(|u| system.name_by_uuid(u))
        .unwrap_or(source)
}

/// `SERVICE+ARG` → (`SERVICE`, `+ARG`); no `+` → argument `+`.
pub fn split_service(service_and_arg: &str) -> (&str, &str) {
    match service_and_arg.find('+') {
        Some(i) => service_and_arg.split_at(i),
        None => (service_and_arg, "+"),
    }
}

/// Python's `ActionType.allow_no_autostart`.
fn allow_no_autostart(target: &str, system: &SystemInfo) -> bool {
    if is_dom0(target) {
        return true;
    }
    if target.starts_with("@dispvm") {
        return false;
    }
    resolve_name(target, system)
        .and_then(|n| system.get(n))
        .is_some_and(|d| d.is_running())
}

/// Python's `Allow.evaluate` target resolution.
fn allow_target(
    redirect: Option<&Token>,
    request: &Request<'_>,
    system: &SystemInfo,
    origin: &Origin,
) -> Result<String, String> {
    let actual = match redirect {
        Some(token) => {
            let (t, substituted) =
                IntendedTarget::from_token(token, system).map_err(|e| e.to_string())?;
            if substituted {
                log::warn!(
                    "qrexec: target {} does not exist, using @default instead",
                    crate::pyrepr::str_repr(&token.text())
                );
            }
            t
        }
        None => request.target.clone(),
    };
    Ok(match actual {
        IntendedTarget::Default => {
            return Err(format!(
                "policy define 'allow' action at {origin} but no target is specified by caller or policy"
            ));
        }
        IntendedTarget::DispVm => match request.source.default_dispvm(system) {
            Some(d) => format!("@dispvm:{d}"),
            None => {
                return Err(format!(
                    "policy define 'allow' action to @dispvm at {origin} but no DispVM base is set for this VM"
                ));
            }
        },
        // `@adminvm` becomes `dom0`; `dom0` and dom0's uuid stay as written
        // (the reply says `target=dom0` for all three)
        IntendedTarget::AdminVm(AdminForm::Keyword) => "dom0".to_owned(),
        other => other.text(),
    })
}

/// Python's `Ask.evaluate` default-target expansion.
fn ask_default(token: &Token, request: &Request<'_>, system: &SystemInfo) -> Option<String> {
    match token {
        Token::DispVm => request
            .source
            .default_dispvm(system)
            .map(|d| format!("@dispvm:{d}")),
        Token::AdminVm(_) => Some("dom0".to_owned()),
        other => Some(other.text()),
    }
}

/// `NotifyAllowedResolution`: tell the user about an allow by a rule with
/// `notify=yes`.
fn notify_allow(
    confirm: &dyn Confirm,
    query: &Query,
    notify: bool,
    decision: Result<Decision, Denial>,
) -> Result<Decision, Denial> {
    if notify && let Ok(Decision::Allow { target, .. }) = &decision {
        let (service, argument) = split_service(&query.service_and_arg);
        confirm.notify(&Notice {
            allowed: true,
            service,
            argument,
            source: &query.source,
            target,
        });
    }
    decision
}

/// `AllowResolution.execute` (or its just-evaluate variant): `target=` and
/// `target_uuid=` of an allow reply. The admin VM in any form is
/// `target=dom0` without a uuid; `@dispvm:X` keeps its text and gets
/// `@dispvm:uuid:` of the template; a qube keeps its text (name or
/// `uuid:U`) and gets `uuid:` of the qube.
fn finish_allow(
    system: &SystemInfo,
    query: &Query,
    request: &Request<'_>,
    user: Option<String>,
    target: String,
    autostart: bool,
) -> Result<Decision, Denial> {
    if query.just_evaluate {
        return Ok(Decision::AllowJustEvaluate);
    }
    // Qubes compares the texts only; a target naming the source by uuid
    // (or dom0 calling `uuid:0…`) is a loopback here too.
    let loopback = || Err(deny("loopback qrexec connection not supported"));
    if request.source.name == target {
        return loopback();
    }
    if is_dom0(&target) {
        if request.source.is_admin {
            return loopback();
        }
        return Ok(Decision::Allow {
            user,
            target: "dom0".to_owned(),
            target_uuid: None,
            autostart,
            requested_target: request.target.text(),
        });
    }
    let (qube, prefix) = match target.strip_prefix("@dispvm:") {
        Some(x) => (x, "@dispvm:uuid:"),
        None => (target.as_str(), "uuid:"),
    };
    // a target that is no qube (an `ask` redirect to `@dispvm` or to a
    // qube that does not exist) is refused, where Qubes fails
    let (name, domain) = resolve_domain(qube, system)
        .ok_or_else(|| deny(format!("target {} is not a qube", printable(&target))))?;
    if prefix == "uuid:" && name == request.source.name {
        return loopback();
    }
    let target_uuid = domain.uuid.as_ref().map(|u| format!("{prefix}{u}"));
    Ok(Decision::Allow {
        user,
        target,
        target_uuid,
        autostart,
        requested_target: request.target.text(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("work"), "work");
        assert_eq!(
            printable("a\nqrexec: forged\r\u{1b}[2J"),
            "a\\nqrexec: forged\\r\\u{1b}[2J"
        );
    }

    #[test]
    fn split_service_and_argument() {
        assert_eq!(split_service("qubes.Gpg"), ("qubes.Gpg", "+"));
        assert_eq!(split_service("qubes.Gpg+"), ("qubes.Gpg", "+"));
        assert_eq!(split_service("a+b+c"), ("a", "+b+c"));
        assert_eq!(split_service(""), ("", "+"));
    }
}
