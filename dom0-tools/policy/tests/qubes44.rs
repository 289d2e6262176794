//! Decisions as Qubes 4.4 makes them: one test per point of issue 10 and
//! per case where our engine once differed from Qubes' parser, with
//! expectations written out by hand (no Python needed). The Qubes
//! behaviour each test pins down was read from qubes-core-qrexec 4.4.2
//! `qrexec/policy/parser.py` and checked by `tests/differential.rs`.
#![allow(clippy::unwrap_used)] // reason: test code

use std::sync::Mutex;

use qrexec_policy::loader::load_text;
use qrexec_policy::{
    AskAnswer, AskQuestion, Confirm, Decision, Domain, NoConfirm, Policy, Query, SystemInfo,
};

const F: &str = "/etc/qubes/policy.d/30-test.policy";
const DOM0: &str = "uuid:00000000-0000-0000-0000-000000000000";
const WORK: &str = "uuid:11111111-1111-4111-8111-111111111111";
const DVM: &str = "uuid:22222222-2222-4222-8222-222222222222";

fn system() -> SystemInfo {
    let mut d = Vec::new();
    let mut add = |name: &str, uuid: &str, f: &dyn Fn(&mut Domain)| {
        let mut dom = Domain::new("AppVM");
        dom.uuid = Some(uuid.strip_prefix("uuid:").unwrap().to_owned());
        f(&mut dom);
        d.push((name.to_owned(), dom));
    };
    add("dom0", DOM0, &|x| {
        x.vm_type = "AdminVM".into();
        x.tags = vec!["admin-tag".into()];
    });
    add("work", WORK, &|x| x.default_dispvm = Some("dvm".into()));
    add("dvm", DVM, &|x| x.template_for_dispvms = true);
    add(
        "personal",
        "uuid:33333333-3333-4333-8333-333333333333",
        &|x| x.default_dispvm = None,
    );
    add(
        "sys-usb",
        "uuid:44444444-4444-4444-8444-444444444444",
        &|x| x.internal = true,
    );
    add(
        "int-dvm",
        "uuid:55555555-5555-4555-8555-555555555555",
        &|x| {
            x.internal = true;
            x.template_for_dispvms = true;
        },
    );
    SystemInfo::new(d).unwrap()
}

fn policy(text: &str) -> Policy {
    let t = tempfile::tempdir().unwrap();
    Policy::from_loaded(load_text(text, F, t.path(), t.path()).unwrap())
}

fn query(source: &str, target: &str) -> Query {
    Query {
        source: source.into(),
        intended_target: target.into(),
        service_and_arg: "s".into(),
        ..Query::default()
    }
}

fn eval(p: &Policy, q: &Query) -> Decision {
    let s = system();
    let d = p.evaluate(q, &s, &NoConfirm);
    assert_eq!(
        d,
        p.evaluate_linear(q, &s, &NoConfirm),
        "index and scan differ"
    );
    d
}

fn assume_yes(p: &Policy, source: &str, target: &str) -> Decision {
    let mut q = query(source, target);
    q.assume_yes_for_ask = true;
    eval(p, &q)
}

struct Record(Mutex<Option<AskQuestion>>);

impl Confirm for Record {
    fn confirm(&self, question: &AskQuestion) -> AskAnswer {
        *self.0.lock().unwrap() = Some(question.clone());
        AskAnswer::Deny
    }
}

/// The question an `ask` puts (None if nobody is asked).
fn question(p: &Policy, source: &str, target: &str) -> Option<AskQuestion> {
    let record = Record(Mutex::new(None));
    p.evaluate(&query(source, target), &system(), &record);
    record.0.into_inner().unwrap()
}

fn choices(p: &Policy, source: &str, target: &str) -> Vec<String> {
    question(p, source, target)
        .map(|q| q.targets)
        .unwrap_or_default()
}

fn reply(d: &Decision) -> String {
    d.reply()
}

fn reason(d: Decision) -> String {
    match d {
        Decision::Deny { reason, .. } => reason,
        other => panic!("expected a deny, got {other:?}"),
    }
}

fn to_dom0(requested: &str) -> String {
    format!(
        "user=DEFAULT\nresult=allow\ntarget=dom0\nautostart=True\nrequested_target={requested}\n"
    )
}

// ---------------------------------------------------------------- point 1

#[test]
fn dom0_uuid_as_requested_target_is_the_admin_vm() {
    // the security hole: @anyvm must not match dom0 asked for by uuid
    let p = policy("s * @anyvm @anyvm allow\ns * @anyvm @adminvm deny\n");
    assert_eq!(
        reason(eval(&p, &query("work", DOM0))),
        format!("denied by policy {F}:2")
    );
    let p = policy(
        "admin.vm.List * @anyvm @anyvm allow user=user\nadmin.vm.List * @anyvm @adminvm deny\n",
    );
    let mut q = query("work", DOM0);
    q.service_and_arg = "admin.vm.List".into();
    assert!(!eval(&p, &q).is_allow());
    // and every admin VM rule does match it
    for target in [
        "@adminvm",
        "dom0",
        DOM0,
        "@type:AdminVM",
        "@tag:admin-tag",
        "*",
    ] {
        let p = policy(&format!("s * work {target} allow\n"));
        assert_eq!(
            reply(&eval(&p, &query("work", DOM0))),
            to_dom0(DOM0),
            "{target}"
        );
    }
}

#[test]
fn dom0_uuid_as_rule_target() {
    let p = policy(&format!("s * work {DOM0} allow\n"));
    for requested in ["dom0", "@adminvm", DOM0] {
        assert_eq!(
            reply(&eval(&p, &query("work", requested))),
            to_dom0(requested)
        );
    }
    assert_eq!(
        reason(eval(&p, &query("work", "personal"))),
        "no matching rule found"
    );
    // as a source too
    let p = policy(&format!("s * {DOM0} work allow\n"));
    assert!(eval(&p, &query("dom0", "work")).is_allow());
    assert!(!eval(&p, &query("personal", "work")).is_allow());
}

#[test]
fn dom0_uuid_as_redirect_target() {
    let p = policy(&format!("s * work @anyvm allow target={DOM0}\n"));
    assert_eq!(
        reply(&eval(&p, &query("work", "personal"))),
        to_dom0("personal")
    );
}

#[test]
fn dom0_uuid_in_ask_choices_and_default() {
    let p = policy(&format!(
        "s * work @anyvm ask target={DOM0} default_target={DOM0}\n"
    ));
    let q = question(&p, "work", "personal").unwrap();
    assert_eq!(q.targets, ["dom0"]);
    assert_eq!(q.default_target.as_deref(), Some("dom0"));
    // collected from the rules: dom0 in any form is offered as `dom0`
    let p = policy(&format!("s * work @default ask\ns * work {DOM0} allow\n"));
    assert_eq!(choices(&p, "work", ""), ["dom0"]);
    let p = policy(&format!(
        "s * work @default ask default_target={DOM0}\ns * work * allow\n"
    ));
    assert_eq!(
        question(&p, "work", "").unwrap().default_target.as_deref(),
        Some("dom0")
    );
    // and assuming yes calls dom0 when dom0 was asked for by name
    let p = policy(&format!("s * work @adminvm ask target={DOM0}\n"));
    assert_eq!(reply(&assume_yes(&p, "work", "dom0")), to_dom0("dom0"));
}

#[test]
fn dom0_calling_itself_by_uuid_is_a_loopback() {
    // Qubes compares texts and would allow this (documented accident)
    let p = policy("s * * * allow\n");
    assert_eq!(
        reason(eval(&p, &query("dom0", DOM0))),
        "loopback qrexec connection not supported"
    );
    assert_eq!(
        reason(eval(&p, &query("work", WORK))),
        "loopback qrexec connection not supported"
    );
}

// ---------------------------------------------------------------- point 2

#[test]
fn dom0_is_not_rewritten_to_adminvm() {
    let p = policy("s * work @adminvm allow\n");
    assert_eq!(reply(&eval(&p, &query("work", "dom0"))), to_dom0("dom0"));
    assert_eq!(
        reply(&eval(&p, &query("work", "@adminvm"))),
        to_dom0("@adminvm")
    );
    // @type:/@tag: see dom0 named as a qube, not the keyword (which is no
    // qube name in Qubes' system info)
    let p = policy("s * work @type:AdminVM allow\n");
    assert!(eval(&p, &query("work", "dom0")).is_allow());
    assert!(eval(&p, &query("work", DOM0)).is_allow());
    assert_eq!(
        reason(eval(&p, &query("work", "@adminvm"))),
        "no matching rule found"
    );
    let p = policy("s * work @tag:admin-tag allow\n");
    assert!(eval(&p, &query("work", "dom0")).is_allow());
    assert!(!eval(&p, &query("work", "@adminvm")).is_allow());
}

#[test]
fn assume_yes_for_ask_keeps_the_requested_form() {
    // the choice offered is `dom0`; asking for `@adminvm` is not among them
    let p = policy("s * work @adminvm ask\n");
    assert_eq!(reply(&assume_yes(&p, "work", "dom0")), to_dom0("dom0"));
    assert_eq!(
        reason(assume_yes(&p, "work", "@adminvm")),
        "target @adminvm is not a valid choice"
    );
    let p = policy("s * work @adminvm ask target=@adminvm\n");
    assert_eq!(choices(&p, "work", "@adminvm"), ["dom0"]);
}

#[test]
fn earlier_deny_of_dom0_removes_it_from_ask_choices() {
    for later in ["dom0", "@adminvm", DOM0] {
        let p = policy(&format!(
            "s * work @default ask\ns * work * deny\ns * work {later} allow\ns * work personal allow\n"
        ));
        assert_eq!(choices(&p, "work", ""), Vec::<String>::new(), "{later}");
        let p = policy(&format!(
            "s * work @default ask\ns * work personal deny\ns * work @anyvm allow target={later}\n"
        ));
        assert_eq!(choices(&p, "work", ""), ["dom0"], "{later}");
    }
    // an earlier `@adminvm deny` removes a later `dom0` (in Qubes it does
    // not: documented accident; case found by the differential test)
    let p = policy(
        "s * work @default ask\ns * work @adminvm deny\ns * work @anyvm allow target=dom0\n",
    );
    assert!(question(&p, "work", "").is_none());
    assert_eq!(
        reason(eval(&p, &query("work", ""))),
        format!("policy define 'ask' action at {F}:1 but no target is available to choose from")
    );
    // `@adminvm` too (Qubes would still offer dom0 here: documented accident)
    let p = policy("s * work @default ask\ns * work dom0 deny\ns * work @adminvm allow\n");
    assert_eq!(
        reason(eval(&p, &query("work", ""))),
        format!("policy define 'ask' action at {F}:1 but no target is available to choose from")
    );
}

// ---------------------------------------------------------------- point 3

#[test]
fn internal_qubes_are_not_offered() {
    let p = policy("s * work @anyvm ask\n");
    let offered = choices(&p, "work", "personal");
    assert_eq!(offered, ["@dispvm:dvm", "dvm", "personal"]);
    // an ask whose only choice is internal is Qubes' "no target" deny
    let p = policy("s * work @default ask\ns * work sys-usb allow\n");
    assert_eq!(
        reason(eval(&p, &query("work", ""))),
        format!("policy define 'ask' action at {F}:1 but no target is available to choose from")
    );
    // nor a disposable of an internal template
    let p = policy("s * work @default ask\ns * work @dispvm:int-dvm allow\n");
    assert!(question(&p, "work", "").is_none());
    // a redirect names the qube explicitly and is offered as written
    let p = policy("s * work @anyvm ask target=sys-usb\n");
    assert_eq!(choices(&p, "work", "personal"), ["sys-usb"]);
}

// ---------------------------------------------------------------- point 4

#[test]
fn dispvm_by_uuid_in_every_position() {
    let dvm = format!("@dispvm:{DVM}");
    let allow_dvm = |target: &str, requested: &str| {
        format!(
            "user=DEFAULT\nresult=allow\ntarget={target}\ntarget_uuid=@dispvm:{DVM}\nautostart=True\nrequested_target={requested}\n"
        )
    };
    // a request
    let p = policy("s * work @dispvm:dvm allow\n");
    assert_eq!(
        reply(&eval(&p, &query("work", &dvm))),
        allow_dvm(&dvm, &dvm)
    );
    // a rule target matches both spellings
    let p = policy(&format!("s * work {dvm} allow\n"));
    assert_eq!(
        reply(&eval(&p, &query("work", "@dispvm:dvm"))),
        allow_dvm("@dispvm:dvm", "@dispvm:dvm")
    );
    assert_eq!(
        reply(&eval(&p, &query("work", &dvm))),
        allow_dvm(&dvm, &dvm)
    );
    // (but, as in Qubes, not `@dispvm` through the source's default, which
    // is compared as text)
    assert_eq!(
        reason(eval(&p, &query("work", "@dispvm"))),
        "no matching rule found"
    );
    // a redirect
    let p = policy(&format!("s * work @anyvm allow target={dvm}\n"));
    assert_eq!(
        reply(&eval(&p, &query("work", "personal"))),
        allow_dvm(&dvm, "personal")
    );
    // an ask expansion offers the name
    let p = policy(&format!("s * work @default ask\ns * work {dvm} allow\n"));
    assert_eq!(choices(&p, "work", ""), ["@dispvm:dvm"]);
    // not a template: refused before any rule
    let p = policy("s * * * allow\n");
    assert_eq!(
        reason(eval(&p, &query("work", &format!("@dispvm:{WORK}")))),
        format!("not a template for dispvm: {WORK}")
    );
}

#[test]
fn dispvm_rule_against_dispvm_request_without_default_is_refused() {
    // Qubes fails comparing `@dispvm:dvm` with `@dispvm` for a qube with no
    // default_dispvm, which refuses the call even if a later rule allows it
    let p = policy("s * personal @dispvm:dvm deny\ns * personal @dispvm allow target=dvm\n");
    assert!(!eval(&p, &query("personal", "@dispvm")).is_allow());
    let p = policy("s * personal @dispvm allow target=dvm\n");
    assert!(eval(&p, &query("personal", "@dispvm")).is_allow());
}

#[test]
fn ask_choices_naming_an_unknown_dispvm_template_are_refused() {
    // Qubes fails listing the choices (`@dispvm:ghost` is no qube)
    let p = policy("s * work @default ask\ns * work @dispvm:ghost deny\ns * work personal allow\n");
    assert!(question(&p, "work", "").is_none());
    assert!(!eval(&p, &query("work", "")).is_allow());
}

#[test]
fn ask_redirect_to_dispvm_keyword_cannot_be_chosen() {
    // offered as `@dispvm`, but choosing it names no qube (Qubes fails)
    let p = policy("s * work @dispvm ask target=@dispvm\n");
    assert_eq!(choices(&p, "work", "@dispvm"), ["@dispvm"]);
    assert_eq!(
        reason(assume_yes(&p, "work", "@dispvm")),
        "target @dispvm is not a qube"
    );
}

// ---------------------------------------------------------------- point 5

#[test]
fn allow_replies_carry_target_uuid() {
    let p = policy("s * * @anyvm allow\n");
    assert_eq!(
        reply(&eval(&p, &query("work", "personal"))),
        "user=DEFAULT\nresult=allow\ntarget=personal\ntarget_uuid=uuid:33333333-3333-4333-8333-333333333333\nautostart=True\nrequested_target=personal\n"
    );
    // a target asked for by uuid stays a uuid
    assert_eq!(
        reply(&eval(&p, &query("personal", WORK))),
        format!(
            "user=DEFAULT\nresult=allow\ntarget={WORK}\ntarget_uuid={WORK}\nautostart=True\nrequested_target={WORK}\n"
        )
    );
    // a new disposable: the template's uuid
    assert_eq!(
        reply(&eval(&p, &query("work", "@dispvm"))),
        format!(
            "user=DEFAULT\nresult=allow\ntarget=@dispvm:dvm\ntarget_uuid=@dispvm:{DVM}\nautostart=True\nrequested_target=@dispvm\n"
        )
    );
}

#[test]
fn notify_on_denials_as_qubes_sets_it() {
    let p = policy("s * * @anyvm allow\n");
    // a malformed requested target is a policy error in Qubes: no notify
    for bad in ["@anyvm", "*", "@tag:x", "@foo", "@dispvm:@tag:x"] {
        assert!(
            matches!(
                eval(&p, &query("work", bad)),
                Decision::Deny { notify: false, .. }
            ),
            "{bad}"
        );
    }
    // a disposable of a qube that is no template: notify
    assert!(matches!(
        eval(&p, &query("work", "@dispvm:work")),
        Decision::Deny { notify: true, .. }
    ));
}
