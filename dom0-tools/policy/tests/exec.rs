//! Runs the `qrexec-policy-exec` binary the way qrexec-daemon runs its
//! fallback policy program (`PROGRAM -- SRC TARGET SVC+ARG`), and its
//! `--check` lint mode.
#![allow(clippy::unwrap_used)] // reason: test code

mod common;

use std::process::{Command, Output};

use common::Dom0;

fn exec(dom0: &Dom0, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
        .arg("--path")
        .arg(dom0.policy_dir())
        .arg("--legacy-policy-path")
        .arg(dom0.legacy_dir())
        .arg("--system-info")
        .arg(dom0.qubes_json())
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn evaluates_like_the_daemon() {
    let dom0 = Dom0::new();
    dom0.write(
        "policy.d/30-user.policy",
        "qubes.Gpg * work vault allow\nqubes.Gpg * @anyvm @anyvm deny\n",
    );
    let o = exec(&dom0, &["--", "work", "vault", "qubes.Gpg"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        stdout(&o),
        "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=vault\n"
    );
    let o = exec(&dom0, &["--", "personal", "vault", "qubes.Gpg+arg"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "result=deny\n");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("qrexec: qubes.Gpg+arg: personal -> vault: denied: denied by policy"),
        "{stderr}"
    );
    let o = exec(
        &dom0,
        &["--just-evaluate", "--", "work", "vault", "qubes.Gpg"],
    );
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "result=allow\n")
    );
}

#[test]
fn legacy_policy_through_compat_directive() {
    let dom0 = Dom0::new();
    dom0.write("policy.d/35-compat.policy", "!compat-4.0\n");
    dom0.write("legacy/test.File+testfile1", "work vault allow\n");
    dom0.write("legacy/test.File", "$anyvm $anyvm allow,target=personal\n");
    let run = |svc: &str| stdout(&exec(&dom0, &["--", "work", "vault", svc]));
    assert_eq!(
        run("test.File+testfile1"),
        "user=DEFAULT\nresult=allow\ntarget=vault\nautostart=True\nrequested_target=vault\n"
    );
    // other arguments fall back to the general file
    assert_eq!(
        run("test.File+other"),
        "user=DEFAULT\nresult=allow\ntarget=personal\nautostart=True\nrequested_target=vault\n"
    );
    // the specific file's implicit deny stops the fallback for other sources
    let o = exec(&dom0, &["--", "sys-net", "vault", "test.File+testfile1"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "result=deny\n")
    );
}

#[test]
fn check_mode_lints_with_file_and_line() {
    let dom0 = Dom0::new();
    dom0.write("policy.d/30-user.policy", "qubes.Gpg * work vault allow\n");
    let o = exec(&dom0, &["--check"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), ""));
    dom0.write(
        "policy.d/30-user.policy",
        "qubes.Gpg * work vault allow\nqubes.Gpg * work\nqubes.Gpg * @default vault deny notify=maybe\n",
    );
    dom0.write("policy.d/40-x.policy", "!include nowhere\n");
    let o = exec(&dom0, &["--check"]);
    assert_eq!(o.status.code(), Some(1));
    let file = dom0.policy_dir().join("30-user.policy");
    let other = dom0.policy_dir().join("40-x.policy");
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "{}:2: error: wrong number of fields\n",
            file.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}:3: error: invalid source token: '@default'\n",
            file.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}:1: error: not a file: ", other.display())),
        "{out}"
    );
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[test]
fn usage_errors() {
    let dom0 = Dom0::new();
    let o = exec(&dom0, &["--", "a", "b"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Must have 3 or 5 positional arguments, not 2")
    );
    // The five-argument form runs allowed calls (tests/qubesd.rs); this
    // one is denied: exit 1, nothing printed.
    let o = exec(&dom0, &["--", "1", "a", "b", "svc", "ident"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let o = exec(&dom0, &["--check", "extra"]);
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(stdout(&o).contains("--assume-yes-for-ask"));
}

#[test]
fn broken_system_info_or_policy_denies() {
    let dom0 = Dom0::new();
    dom0.write("policy.d/30-user.policy", "* * @anyvm @anyvm allow\n");
    std::fs::write(dom0.qubes_json(), "{").unwrap();
    let o = exec(&dom0, &["--", "work", "vault", "qubes.Gpg"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "result=deny\n")
    );
    std::fs::write(dom0.qubes_json(), common::QUBES_JSON).unwrap();
    dom0.write("policy.d/31-bad.policy", "* * @anyvm @anyvm allow bogus\n");
    let o = exec(&dom0, &["--", "work", "vault", "qubes.Gpg"]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "result=deny\n")
    );
}

#[test]
fn paths_from_the_environment() {
    let dom0 = Dom0::new();
    dom0.write("policy.d/30-user.policy", "qubes.Gpg * work vault allow\n");
    let o = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
        .env(
            "QREXEC_POLICY_PATH",
            format!("/nonexistent-first:{}", dom0.policy_dir().display()),
        )
        .env("QREXEC_SYSTEM_INFO", dom0.qubes_json())
        .env("QREXEC_LEGACY_POLICY_PATH", dom0.legacy_dir())
        .args(["--", "work", "vault", "qubes.Gpg"])
        .output()
        .unwrap();
    // a missing policy directory is an error, as in Qubes
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(1), "result=deny\n")
    );
    let o = Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
        .env("QREXEC_POLICY_PATH", dom0.policy_dir())
        .env("QREXEC_SYSTEM_INFO", dom0.qubes_json())
        .args(["--", "work", "vault", "qubes.Gpg"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn exec_under(root: &std::path::Path, dom0: &Dom0, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qrexec-policy-exec"))
        .arg("--root")
        .arg(root)
        .arg("--system-info")
        .arg(dom0.qubes_json())
        .args(args)
        .env_remove("QREXEC_POLICY_PATH")
        .env_remove("QREXEC_LEGACY_POLICY_PATH")
        .output()
        .unwrap()
}

#[test]
fn root_option_reads_a_tree_that_is_not_installed() {
    let dom0 = Dom0::new();
    let root = dom0.path("image");
    let put = |rel: &str, text: &str| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    std::fs::create_dir_all(root.join("run/qubes/policy.d")).unwrap();
    put(
        "etc/qubes/policy.d/30-user.policy",
        "!include /etc/qubes/policy.d/include/extra\n\
         !include-service svc.C * /etc/qubes/policy.d/include/old\n\
         !compat-4.0\n",
    );
    put("etc/qubes/policy.d/include/extra", "s * work vault allow\n");
    put(
        "etc/qubes/policy.d/include/old",
        "$anyvm $anyvm allow,target=vault\n",
    );
    put(
        "etc/qubes-rpc/policy/svc.B",
        "$include:/etc/qubes-rpc/policy/shared\n",
    );
    put(
        "etc/qubes-rpc/policy/shared",
        "$anyvm $anyvm allow,target=personal\n",
    );
    // absolute `!include`, `!include-service` and `$include:` all read
    // inside the root
    let o = exec_under(&root, &dom0, &["--", "work", "vault", "s"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = exec_under(&root, &dom0, &["--", "work", "", "svc.B"]);
    assert!(stdout(&o).contains("target=personal\n"), "{}", stdout(&o));
    let o = exec_under(&root, &dom0, &["--", "work", "", "svc.C"]);
    assert!(stdout(&o).contains("target=vault\n"), "{}", stdout(&o));
    let o = exec_under(&root, &dom0, &["--check"]);
    assert_eq!((o.status.code(), stdout(&o).as_str()), (Some(0), ""));
    // errors name the installed paths, and `..` does not leave the root
    put(
        "etc/qubes/policy.d/include/extra",
        "s * work vault allow\ns * work vault permit\n!include ../../../../../../etc/passwd\n",
    );
    let o = exec_under(&root, &dom0, &["--check"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o),
        "/etc/qubes/policy.d/include/extra:2: error: invalid action: permit\n\
         /etc/qubes/policy.d/include/extra:3: error: not a file: /etc/passwd\n"
    );
    let o = exec_under(&root, &dom0, &["--", "work", "vault", "s"]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(
            "error loading policy: /etc/qubes/policy.d/include/extra:2: invalid action: permit"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains(&root.display().to_string()), "{stderr}");
}

#[test]
fn control_characters_of_a_policy_line_are_escaped() {
    let dom0 = Dom0::new();
    dom0.write(
        "policy.d/30-user.policy",
        "s * work vault \u{1b}[2Jallow\u{7f}\n",
    );
    let o = exec(&dom0, &["--", "work", "vault", "s"]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("invalid action: \\u{1b}[2Jallow\\u{7f}"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}') && !stderr.contains('\u{7f}'),
        "{stderr}"
    );
    let o = exec(&dom0, &["--check"]);
    let out = stdout(&o);
    assert!(
        out.contains("invalid action: \\u{1b}[2Jallow\\u{7f}\n"),
        "{out}"
    );
    assert!(!out.contains('\u{1b}'), "{out}");
}
