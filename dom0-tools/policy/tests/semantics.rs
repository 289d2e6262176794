//! One test per semantic corner of the policy language, including the
//! examples of the seed documents (qrexec3 doc, the original RPC HOWTO) and
//! PROTOCOLS.md.
#![allow(clippy::unwrap_used)] // reason: test code

use qrexec_policy::loader::load_text;
use qrexec_policy::{
    AskAnswer, AskQuestion, Confirm, Decision, Domain, NoConfirm, Policy, Query, SystemInfo,
};

fn system() -> SystemInfo {
    let mut d = Vec::new();
    let mut add = |name: &str, f: &dyn Fn(&mut Domain)| {
        let mut dom = Domain::new("AppVM");
        f(&mut dom);
        d.push((name.to_owned(), dom));
    };
    add("dom0", &|x| x.vm_type = "AdminVM".into());
    add("work", &|x| {
        x.tags = vec!["work".into()];
        x.default_dispvm = Some("dvm".into());
        x.uuid = Some("11111111-2222-3333-4444-555555555555".into());
    });
    add("work-mail", &|x| x.default_dispvm = Some("dvm".into()));
    add("work-archive", &|_| {});
    add("work-files", &|x| x.tags = vec!["work".into()]);
    add("personal", &|x| x.default_dispvm = None);
    add("vault", &|x| x.power_state = "Halted".into());
    add("dvm", &|x| {
        x.template_for_dispvms = true;
        x.tags = vec!["disp-ok".into()];
    });
    add("anon-whonix", &|x| {
        x.default_dispvm = Some("whonix-dvm".into())
    });
    add("anon-whonix-dvm", &|x| x.template_for_dispvms = true);
    add("whonix-dvm", &|x| x.template_for_dispvms = true);
    add("source_vm1", &|_| {});
    add("source_vm2", &|_| {});
    add("target_vm", &|_| {});
    add("tpl", &|x| x.vm_type = "TemplateVM".into());
    SystemInfo::new(d).unwrap()
}

fn policy(text: &str) -> Policy {
    let t = tempfile::tempdir().unwrap();
    Policy::from_loaded(
        load_text(
            text,
            "/etc/qubes/policy.d/30-test.policy",
            t.path(),
            t.path(),
        )
        .unwrap(),
    )
}

fn legacy_policy(files: &[(&str, &str)]) -> Policy {
    let t = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(t.path().join(name), text).unwrap();
    }
    Policy::from_loaded(
        load_text(
            "!compat-4.0",
            "/etc/qubes/policy.d/35-compat.policy",
            t.path(),
            t.path(),
        )
        .unwrap(),
    )
}

fn q(source: &str, target: &str, service: &str) -> Query {
    Query {
        source: source.into(),
        intended_target: target.into(),
        service_and_arg: service.into(),
        ..Query::default()
    }
}

fn eval(p: &Policy, query: &Query) -> Decision {
    let s = system();
    let indexed = p.evaluate(query, &s, &NoConfirm);
    assert_eq!(
        indexed,
        p.evaluate_linear(query, &s, &NoConfirm),
        "index and scan differ"
    );
    indexed
}

/// An allow to `target` as Qubes replies it; `target_uuid` is the uuid the
/// test system gives the qube (or the disposable's template).
fn allow(target: &str, requested: &str) -> Decision {
    let (qube, prefix) = match target.strip_prefix("@dispvm:") {
        Some(x) => (x, "@dispvm:uuid:"),
        None => (target, "uuid:"),
    };
    let target_uuid = system()
        .get(qube)
        .and_then(|d| d.uuid.clone())
        .filter(|_| target != "dom0")
        .map(|u| format!("{prefix}{u}"));
    Decision::Allow {
        user: None,
        target: target.into(),
        target_uuid,
        autostart: true,
        requested_target: requested.into(),
    }
}

fn reason(d: Decision) -> String {
    match d {
        Decision::Deny { reason, .. } => reason,
        other => panic!("expected deny, got {other:?}"),
    }
}

const F: &str = "/etc/qubes/policy.d/30-test.policy";

#[test]
fn first_match_wins() {
    let p = policy("s * work vault deny\ns * work vault allow\n");
    assert_eq!(
        reason(eval(&p, &q("work", "vault", "s"))),
        format!("denied by policy {F}:1")
    );
    let p = policy("s * work vault allow\ns * work vault deny\n");
    assert_eq!(eval(&p, &q("work", "vault", "s")), allow("vault", "vault"));
}

#[test]
fn no_rule_is_a_deny() {
    let p = policy("s * work vault allow\n");
    assert_eq!(
        reason(eval(&p, &q("personal", "vault", "s"))),
        "no matching rule found"
    );
    assert_eq!(
        reason(eval(&p, &q("work", "vault", "other"))),
        "no matching rule found"
    );
}

#[test]
fn service_and_argument_matching() {
    let p = policy(
        "s +a work vault allow user=a\ns + work vault allow user=empty\ns * work vault allow user=any\n* * work vault allow user=all\n",
    );
    let user = |svc: &str| match eval(&p, &q("work", "vault", svc)) {
        Decision::Allow { user, .. } => user.unwrap(),
        d => panic!("{d:?}"),
    };
    assert_eq!(user("s+a"), "a");
    assert_eq!(user("s"), "empty"); // no argument is the empty argument "+"
    assert_eq!(user("s+"), "empty");
    assert_eq!(user("s+b"), "any");
    assert_eq!(user("t+b"), "all");
}

#[test]
fn redirect_stands_even_if_another_rule_denies_the_target() {
    // seed 001: "the request will be allowed ... even if there is a rule
    // explicitly denying it"
    let p = policy(
        "s * anon-whonix @dispvm allow target=@dispvm:anon-whonix-dvm\n\
         s * @anyvm @dispvm:anon-whonix-dvm deny\n\
         s * work @anyvm allow target=vault\n\
         s * @anyvm vault deny\n",
    );
    assert_eq!(
        eval(&p, &q("anon-whonix", "@dispvm", "s")),
        allow("@dispvm:anon-whonix-dvm", "@dispvm")
    );
    assert_eq!(
        eval(&p, &q("work", "personal", "s")),
        allow("vault", "personal")
    );
    assert!(!eval(&p, &q("personal", "vault", "s")).is_allow());
}

#[test]
fn anyvm_never_matches_dom0() {
    let p = policy("s * @anyvm @anyvm allow\ns * @anyvm dom0 allow user=root\n");
    match eval(&p, &q("work", "dom0", "s")) {
        Decision::Allow {
            user,
            target,
            requested_target,
            ..
        } => {
            assert_eq!(user.as_deref(), Some("root"));
            assert_eq!(target, "dom0");
            // Qubes 4.3.8+: `dom0` is no longer rewritten to `@adminvm`
            assert_eq!(requested_target, "dom0");
        }
        d => panic!("{d:?}"),
    }
    let p = policy("s * @anyvm @anyvm allow\n");
    assert_eq!(
        reason(eval(&p, &q("work", "@adminvm", "s"))),
        "no matching rule found"
    );
    // nor dom0 as a source; `*` and @adminvm do
    assert_eq!(
        reason(eval(&p, &q("dom0", "work", "s"))),
        "no matching rule found"
    );
    let p = policy("s * @adminvm work allow\n");
    assert_eq!(eval(&p, &q("dom0", "work", "s")), allow("work", "work"));
    let p = policy("s * * * allow\n");
    assert_eq!(eval(&p, &q("work", "dom0", "s")), allow("dom0", "dom0"));
    assert_eq!(
        eval(&p, &q("work", "@adminvm", "s")),
        allow("dom0", "@adminvm")
    );
}

#[test]
fn default_target() {
    // @default with allow needs target= (a syntax error otherwise)
    let t = tempfile::tempdir().unwrap();
    let err = load_text("s * work @default allow\n", F, t.path(), t.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{F}:1: allow action for @default rule must specify target= option")
    );
    let p = policy("s * work @default allow target=vault\ns * personal @anyvm allow\n");
    assert_eq!(eval(&p, &q("work", "", "s")), allow("vault", "@default"));
    assert_eq!(
        eval(&p, &q("work", "@default", "s")),
        allow("vault", "@default")
    );
    // @anyvm matches a @default request, but allow has nowhere to go
    assert_eq!(
        reason(eval(&p, &q("personal", "", "s"))),
        format!(
            "policy define 'allow' action at {F}:2 but no target is specified by caller or policy"
        )
    );
    // a qube that does not exist is @default
    assert_eq!(
        eval(&p, &q("work", "no-such-qube", "s")),
        allow("vault", "@default")
    );
}

#[test]
fn dispvm_resolution_through_default_dispvm() {
    let p = policy("s * @anyvm @dispvm allow\n");
    assert_eq!(
        eval(&p, &q("work", "@dispvm", "s")),
        allow("@dispvm:dvm", "@dispvm")
    );
    assert_eq!(
        reason(eval(&p, &q("personal", "@dispvm", "s"))),
        format!(
            "policy define 'allow' action to @dispvm at {F}:1 but no DispVM base is set for this VM"
        )
    );
    // @dispvm:X in the policy matches a @dispvm request resolved to X
    let p = policy("s * @anyvm @dispvm:dvm allow\n");
    assert_eq!(
        eval(&p, &q("work", "@dispvm", "s")),
        allow("@dispvm:dvm", "@dispvm")
    );
    assert_eq!(
        eval(&p, &q("work", "@dispvm:dvm", "s")),
        allow("@dispvm:dvm", "@dispvm:dvm")
    );
    assert_eq!(
        reason(eval(&p, &q("anon-whonix", "@dispvm", "s"))),
        "no matching rule found"
    );
    // a @dispvm:X request needs X to be a template for disposables
    assert_eq!(
        reason(eval(&p, &q("work", "@dispvm:work", "s"))),
        "not a template for dispvm: work"
    );
    // @dispvm:@tag:T
    let p = policy("s * @anyvm @dispvm:@tag:disp-ok allow\n");
    assert_eq!(
        eval(&p, &q("work", "@dispvm", "s")),
        allow("@dispvm:dvm", "@dispvm")
    );
    assert!(!eval(&p, &q("work", "@dispvm:whonix-dvm", "s")).is_allow());
}

#[test]
fn tags_types_and_uuids() {
    let p = policy(
        "s * @tag:work @type:TemplateVM allow\n\
         s * uuid:11111111-2222-3333-4444-555555555555 vault allow user=byuuid\n\
         s * personal uuid:11111111-2222-3333-4444-555555555555 allow\n",
    );
    assert_eq!(eval(&p, &q("work-files", "tpl", "s")), allow("tpl", "tpl"));
    assert!(!eval(&p, &q("personal", "tpl", "s")).is_allow());
    assert!(
        matches!(eval(&p, &q("work", "vault", "s")), Decision::Allow { user: Some(u), .. } if u == "byuuid")
    );
    const W: &str = "uuid:11111111-2222-3333-4444-555555555555";
    let with_uuid = |target: &str, requested: &str| Decision::Allow {
        user: None,
        target: target.into(),
        target_uuid: Some(W.into()),
        autostart: true,
        requested_target: requested.into(),
    };
    assert_eq!(
        eval(&p, &q("personal", "work", "s")),
        with_uuid("work", "work")
    );
    // a target asked for by uuid stays a uuid in the reply, as in Qubes
    assert_eq!(eval(&p, &q("personal", W, "s")), with_uuid(W, W));
    // a source given by uuid is that qube
    assert!(matches!(
        eval(&p, &q("uuid:11111111-2222-3333-4444-555555555555", "vault", "s")),
        Decision::Allow { user: Some(u), .. } if u == "byuuid"
    ));
}

#[test]
fn loopback_and_autostart() {
    let p = policy("s * @anyvm @anyvm allow autostart=no\n");
    assert_eq!(
        reason(eval(&p, &q("work", "work", "s"))),
        "loopback qrexec connection not supported"
    );
    assert_eq!(
        eval(&p, &q("work", "personal", "s")),
        Decision::Allow {
            user: None,
            target: "personal".into(),
            target_uuid: None,
            autostart: false,
            requested_target: "personal".into()
        }
    );
    assert_eq!(
        reason(eval(&p, &q("work", "vault", "s"))),
        "target vault is denied because it would require autostart"
    );
    assert_eq!(
        reason(eval(&p, &q("work", "@dispvm", "s"))),
        "target @dispvm:dvm is denied because it would require autostart"
    );
}

#[test]
fn just_evaluate_and_assume_yes() {
    let p = policy("s * work vault allow\na * work @anyvm ask\n");
    let mut query = q("work", "vault", "s");
    query.just_evaluate = true;
    assert_eq!(eval(&p, &query), Decision::AllowJustEvaluate);
    let mut query = q("work", "vault", "a");
    query.just_evaluate = true;
    assert!(!eval(&p, &query).is_allow());
    query.assume_yes_for_ask = true;
    assert_eq!(eval(&p, &query), Decision::AllowJustEvaluate);
    query.just_evaluate = false;
    assert_eq!(eval(&p, &query), allow("vault", "vault"));
    // assume-yes answers with the requested target, which must be a choice
    let mut query = q("work", "", "a");
    query.assume_yes_for_ask = true;
    assert_eq!(
        reason(eval(&p, &query)),
        "target @default is not a valid choice"
    );
}

struct Answer(AskAnswer, std::sync::Mutex<Vec<AskQuestion>>);

impl Confirm for Answer {
    fn confirm(&self, question: &AskQuestion) -> AskAnswer {
        self.1.lock().unwrap().push(question.clone());
        self.0.clone()
    }
}

fn ask(p: &Policy, query: &Query, answer: AskAnswer) -> (Decision, AskQuestion) {
    let confirm = Answer(answer, std::sync::Mutex::new(Vec::new()));
    let d = p.evaluate(query, &system(), &confirm);
    let question = confirm.1.lock().unwrap().pop().unwrap();
    (d, question)
}

#[test]
fn ask_choices_from_seed_example() {
    // seed 001, "default_target" example
    let p = policy(
        "s * work-mail work-archive allow\n\
         s * work-mail @tag:work ask default_target=work-files\n\
         s * work-mail @default ask default_target=work-files\n",
    );
    assert_eq!(
        eval(&p, &q("work-mail", "work-archive", "s")),
        allow("work-archive", "work-archive")
    );
    let (d, question) = ask(
        &p,
        &q("work-mail", "", "s"),
        AskAnswer::Allow("work-files".into()),
    );
    assert_eq!(d, allow("work-files", "@default"));
    assert_eq!(question.targets, vec!["work", "work-archive", "work-files"]);
    assert_eq!(question.default_target.as_deref(), Some("work-files"));
    assert_eq!(
        (
            question.source.as_str(),
            question.service.as_str(),
            question.argument.as_str()
        ),
        ("work-mail", "s", "+")
    );
    // a choice outside the list is refused, so is a denial
    let (d, _) = ask(
        &p,
        &q("work-mail", "", "s"),
        AskAnswer::Allow("personal".into()),
    );
    assert_eq!(reason(d), "target personal is not a valid choice");
    let (d, _) = ask(&p, &q("work-mail", "", "s"), AskAnswer::Deny);
    assert_eq!(reason(d), format!("denied by the user {F}:3"));
    let (d, _) = ask(&p, &q("work-mail", "", "s"), AskAnswer::Invalid("x".into()));
    assert_eq!(reason(d), "invalid response");
}

#[test]
fn ask_choices_exclude_later_denies_and_source() {
    let p = policy(
        "s * work vault deny\n\
         s * work @anyvm ask\n\
         s * work @dispvm allow\n\
         s * work dom0 allow\n\
         s * @anyvm @anyvm deny\n",
    );
    let (_, question) = ask(&p, &q("work", "personal", "s"), AskAnswer::Deny);
    assert!(
        !question.targets.contains(&"work".to_owned()),
        "source offered"
    );
    assert!(
        question.targets.contains(&"dom0".to_owned()),
        "{:?}",
        question.targets
    );
    assert!(question.targets.contains(&"@dispvm:dvm".to_owned()));
    assert!(question.targets.contains(&"personal".to_owned()));
    // an earlier deny removes its targets from the choices ...
    assert!(
        !question.targets.contains(&"vault".to_owned()),
        "{:?}",
        question.targets
    );
    // ... a later one does not (the ask rule would have matched first)
    let p = policy("s * work @anyvm ask\ns * work vault deny\n");
    let (_, question) = ask(&p, &q("work", "personal", "s"), AskAnswer::Deny);
    assert!(
        question.targets.contains(&"vault".to_owned()),
        "{:?}",
        question.targets
    );
    // ask with a redirect offers only that
    let p = policy("s * work @anyvm ask target=vault default_target=vault autostart=no\n");
    assert_eq!(
        reason(p.evaluate(&q("work", "personal", "s"), &system(), &NoConfirm)),
        format!("policy define 'ask' action at {F}:1 but no target is available to choose from")
    );
    let p = policy(
        "s * work @anyvm ask target=uuid:11111111-2222-3333-4444-555555555555\n\
         s * personal @anyvm ask target=uuid:00000000-dead-beef-0000-000000000000\n",
    );
    let (_, question) = ask(&p, &q("work", "personal", "s"), AskAnswer::Deny);
    // Qubes 4.4 offers a redirect as written (a uuid is not turned into a name)
    assert_eq!(
        question.targets,
        vec!["uuid:11111111-2222-3333-4444-555555555555"]
    );
    // a uuid that names no qube is offered too (as in Qubes), but choosing
    // it is refused
    let (d, question) = ask(
        &p,
        &q("personal", "vault", "s"),
        AskAnswer::Allow("uuid:00000000-dead-beef-0000-000000000000".into()),
    );
    assert_eq!(
        question.targets,
        vec!["uuid:00000000-dead-beef-0000-000000000000"]
    );
    assert_eq!(
        reason(d),
        "target uuid:00000000-dead-beef-0000-000000000000 is not a qube"
    );
    let p = policy("s * work @anyvm ask target=vault default_target=vault\n");
    let (d, question) = ask(
        &p,
        &q("work", "personal", "s"),
        AskAnswer::Allow("vault".into()),
    );
    assert_eq!(question.targets, vec!["vault"]);
    assert_eq!(d, allow("vault", "personal"));
}

#[test]
fn ask_without_confirmation_is_a_deny() {
    let p = policy("s * work @anyvm ask\n");
    let r = reason(eval(&p, &q("work", "vault", "s")));
    assert_eq!(
        r,
        format!("policy define 'ask' action at {F}:1 but no confirmation program is configured")
    );
}

#[test]
fn deny_notify() {
    let p = policy("s * work vault deny notify=no\ns * work personal deny\n");
    assert!(matches!(
        eval(&p, &q("work", "vault", "s")),
        Decision::Deny { notify: false, .. }
    ));
    assert!(matches!(
        eval(&p, &q("work", "personal", "s")),
        Decision::Deny { notify: true, .. }
    ));
}

#[test]
fn seed_002_howto_and_test_file_example() {
    // seed 002: `anyvm anyvm ask` for test.Add, in the legacy directory
    let p = legacy_policy(&[("test.Add", "$anyvm $anyvm ask\n")]);
    let mut query = q("work", "personal", "test.Add");
    query.assume_yes_for_ask = true;
    assert_eq!(eval(&p, &query), allow("personal", "personal"));
    // seed 001: test.File with per-argument files falling back to the
    // general one
    let p = legacy_policy(&[
        ("test.File+testfile1", "source_vm1 target_vm allow\n"),
        ("test.File+testfile2", "source_vm2 target_vm allow\n"),
        ("test.File", "$anyvm $anyvm deny\n"),
    ]);
    assert_eq!(
        eval(&p, &q("source_vm1", "target_vm", "test.File+testfile1")),
        allow("target_vm", "target_vm")
    );
    assert_eq!(
        eval(&p, &q("source_vm2", "target_vm", "test.File+testfile2")),
        allow("target_vm", "target_vm")
    );
    assert!(!eval(&p, &q("source_vm1", "target_vm", "test.File+testfile2")).is_allow());
    assert!(!eval(&p, &q("source_vm2", "target_vm", "test.File+other")).is_allow());
    // the implicit deny after an argument file hides the general file
    let p = legacy_policy(&[
        ("test.File+testfile1", "source_vm1 target_vm allow\n"),
        ("test.File", "$anyvm $anyvm allow\n"),
    ]);
    let r = reason(eval(
        &p,
        &q("source_vm2", "target_vm", "test.File+testfile1"),
    ));
    assert!(r.contains("test.File+testfile1:0"), "{r}");
    assert_eq!(
        eval(&p, &q("source_vm2", "target_vm", "test.File+x")),
        allow("target_vm", "target_vm")
    );
    assert!(!eval(&p, &q("source_vm2", "dom0", "test.File+testfile1")).is_allow());
}

#[test]
fn legacy_dispvm_tokens() {
    // seed 001: `$dispvm:DISP_VM` and redirection to it
    let p = legacy_policy(&[(
        "qubes.OpenInVM",
        "anon-whonix $dispvm:anon-whonix-dvm allow\nanon-whonix $dispvm allow,target=$dispvm:anon-whonix-dvm\nwork $dispvm allow\n$anyvm $anyvm deny\n",
    )]);
    assert_eq!(
        eval(
            &p,
            &q(
                "anon-whonix",
                "$dispvm:anon-whonix-dvm".replace('$', "@").as_str(),
                "qubes.OpenInVM"
            )
        ),
        allow("@dispvm:anon-whonix-dvm", "@dispvm:anon-whonix-dvm")
    );
    assert_eq!(
        eval(&p, &q("anon-whonix", "@dispvm", "qubes.OpenInVM")),
        allow("@dispvm:anon-whonix-dvm", "@dispvm")
    );
    assert_eq!(
        eval(&p, &q("work", "@dispvm", "qubes.OpenInVM")),
        allow("@dispvm:dvm", "@dispvm")
    );
}

#[test]
fn requested_source_must_be_the_source() {
    let p = policy("s * @anyvm @anyvm allow\n");
    let mut query = q("work", "vault", "s");
    query.requested_source = Some("work".into());
    assert!(eval(&p, &query).is_allow());
    query.requested_source = Some("personal".into());
    assert!(!eval(&p, &query).is_allow());
}

#[test]
fn intended_target_keywords() {
    let p = policy("s * @anyvm @anyvm allow\n");
    assert_eq!(
        reason(eval(&p, &q("work", "@anyvm", "s"))),
        "<unknown>:0: invalid intendedtarget token: '@anyvm'"
    );
    assert_eq!(
        reason(eval(&p, &q("work", "vault", ""))),
        "empty service name"
    );
    assert_eq!(
        reason(eval(&p, &q("work", "vault", "+arg"))),
        "empty service name"
    );
}

#[test]
fn reply_format() {
    assert_eq!(
        allow("vault", "@default").reply(),
        "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=@default\n"
    );
    assert_eq!(
        Decision::Allow {
            user: Some("root".into()),
            target: "dom0".into(),
            target_uuid: None,
            autostart: false,
            requested_target: "@adminvm".into()
        }
        .reply(),
        "user=root\nresult=allow\ntarget=dom0\nautostart=False\nrequested_target=@adminvm\n"
    );
    assert_eq!(Decision::AllowJustEvaluate.reply(), "result=allow\n");
    assert_eq!(reason_reply(), "result=deny\n");
}

fn reason_reply() -> String {
    Decision::Deny {
        reason: String::new(),
        notify: true,
    }
    .reply()
}
