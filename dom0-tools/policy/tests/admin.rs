//! The policy admin API (`qrexec_policy::admin`, `qubes-policy-admin`):
//! each service with good and malformed input, validation before a change
//! goes live, the program's output and exit codes, and a differential run of
//! the same request sequence against Qubes' own `PolicyAdmin` (unpacked from
//! `../shared/reference/qubes-core-qrexec.tar.gz` and run with `python3`;
//! skipped with a message when either is missing).

#![allow(clippy::unwrap_used)] // reason: test code

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qrexec_policy::admin::{AdminError, PolicyAdmin, compute_token};

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("policy.d/include")).unwrap();
        fs::create_dir_all(dir.path().join("legacy")).unwrap();
        Tree { dir }
    }

    fn policy_dir(&self) -> PathBuf {
        fs::canonicalize(self.dir.path().join("policy.d")).unwrap()
    }

    fn write(&self, rel: &str, text: &str) {
        fs::write(self.policy_dir().join(rel), text).unwrap();
    }

    fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.policy_dir().join(rel)).ok()
    }

    fn admin(&self) -> PolicyAdmin {
        PolicyAdmin::new(&self.policy_dir(), &self.dir.path().join("legacy")).unwrap()
    }

    fn call(&self, service: &str, arg: &str, payload: &str) -> Result<String, AdminError> {
        self.admin()
            .handle_request(service, arg, payload.as_bytes())
            .map(|out| String::from_utf8(out.unwrap_or_default()).unwrap())
    }

    /// Every file under the policy directory, relative path → bytes.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let root = self.policy_dir();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(&root).unwrap().display().to_string();
                if meta.is_dir() {
                    stack.push(path);
                } else if meta.file_type().is_symlink() {
                    out.insert(
                        rel,
                        fs::read_link(&path).unwrap().display().to_string().into(),
                    );
                } else {
                    out.insert(rel, fs::read(&path).unwrap());
                }
            }
        }
        out
    }
}

fn err(class: &str, message: &str) -> Result<String, (String, String)> {
    Err((class.to_owned(), message.to_owned()))
}

fn classify(r: Result<String, AdminError>) -> Result<String, (String, String)> {
    r.map_err(|e| (e.class_name().to_owned(), e.message().to_owned()))
}

#[test]
fn list_and_include_list() {
    let t = Tree::new();
    t.write("50-b.policy", "");
    t.write("30-a.policy", "");
    t.write("README", "");
    t.write("include/zz", "");
    t.write("include/aa.policy", "");
    fs::create_dir(t.policy_dir().join("dir.policy")).unwrap();
    t.write("é-not-listed", "");
    assert_eq!(
        classify(t.call("policy.List", "", "")),
        Ok("30-a\n50-b\n".into())
    );
    assert_eq!(
        classify(t.call("policy.include.List", "", "")),
        Ok("aa.policy\nzz\n".into())
    );
    assert_eq!(
        classify(t.call("policy.List", "x", "")),
        err("PolicyAdminProtocolException", "Unexpected argument")
    );
    assert_eq!(
        classify(t.call("policy.include.List", "", "x")),
        err("PolicyAdminProtocolException", "Unexpected payload")
    );
    // Qubes answers in ASCII: a listed name that is not fails (exit 2).
    t.write("é.policy", "");
    assert!(matches!(
        t.call("policy.List", "", ""),
        Err(AdminError::Internal(_))
    ));
    assert_eq!(
        classify(t.call("policy.Nothing", "", "")),
        err(
            "PolicyAdminProtocolException",
            "unrecognized method: policy.Nothing"
        )
    );
}

#[test]
fn get_returns_token_and_content_and_checks_names() {
    let t = Tree::new();
    t.write("30-user.policy", "svc * @anyvm @anyvm deny\n");
    let expected = format!(
        "{}\nsvc * @anyvm @anyvm deny\n",
        compute_token(b"svc * @anyvm @anyvm deny\n")
    );
    assert_eq!(classify(t.call("policy.Get", "30-user", "")), Ok(expected));
    let dir = t.policy_dir().display().to_string();
    assert_eq!(
        classify(t.call("policy.Get", "nope", "")),
        err(
            "PolicyAdminFileNotFoundException",
            &format!("Not found: {dir}/nope.policy")
        )
    );
    for bad in ["", "a.b", "..", "x+y"] {
        assert_eq!(
            classify(t.call("policy.Get", bad, "")),
            err(
                "PolicyAdminInvalidFileNameException",
                &format!(
                    "Invalid policy file name: {bad}\nNames must contain only alphanumeric characters, underscore and hyphen."
                )
            ),
            "{bad:?}"
        );
    }
    for bad in ["a b", "../x", "a/b", "é"] {
        assert_eq!(
            classify(t.call("policy.Get", bad, "")),
            err(
                "PolicyAdminProtocolException",
                &format!(
                    "Invalid argument: \"{bad}\"\nValid characters are letters, numbers, dot, plus, hyphen and underline"
                )
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        classify(t.call("policy.Get", "30-user", "payload")),
        err("PolicyAdminProtocolException", "Unexpected payload")
    );
}

#[test]
fn symlinks_out_of_the_directory_are_refused() {
    let t = Tree::new();
    let outside = t.dir.path().join("outside");
    fs::write(&outside, "secret\n").unwrap();
    symlink(&outside, t.policy_dir().join("include/link")).unwrap();
    symlink(&outside, t.policy_dir().join("evil.policy")).unwrap();
    symlink("/nonexistent/x", t.policy_dir().join("include/dangling")).unwrap();
    let dir = t.policy_dir().display().to_string();
    for (service, name, payload, where_) in [
        ("policy.include.Get", "link", "", format!("{dir}/include")),
        ("policy.Get", "evil", "", dir.clone()),
        ("policy.Replace", "evil", "any\n", dir.clone()),
        (
            "policy.include.Replace",
            "link",
            "any\n",
            format!("{dir}/include"),
        ),
        (
            "policy.include.Remove",
            "dangling",
            "any",
            format!("{dir}/include"),
        ),
    ] {
        assert_eq!(
            classify(t.call(service, name, payload)),
            err(
                "PolicyAdminInvalidFilePathException",
                &format!("Expecting a path inside {where_}")
            ),
            "{service} {name}"
        );
    }
    assert_eq!(fs::read_to_string(&outside).unwrap(), "secret\n");
}

#[test]
fn replace_tokens() {
    let t = Tree::new();
    let text = "svc * @anyvm @anyvm deny\n";
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", &format!("new\n{text}"))),
        Ok(String::new())
    );
    assert_eq!(t.read("30-user.policy").as_deref(), Some(text));
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", "new\n")),
        err(
            "PolicyAdminTokenException",
            "File exists but token is 'new'"
        )
    );
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", "sha256:0000\n")),
        err("PolicyAdminTokenException", "Token mismatch")
    );
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", "bogus\n")),
        err("PolicyAdminProtocolException", "Unrecognized token")
    );
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", "any")),
        err(
            "PolicyAdminProtocolException",
            "Payload needs to include first line with token"
        )
    );
    assert_eq!(
        classify(t.call("policy.Replace", "40-other", "sha256:00\n")),
        err(
            "PolicyAdminTokenException",
            "File doesn't exist, but token isn't 'new'"
        )
    );
    let token = compute_token(text.as_bytes());
    let second = "svc * @anyvm @anyvm allow\n";
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", &format!("{token}\n{second}"))),
        Ok(String::new())
    );
    assert_eq!(t.read("30-user.policy").as_deref(), Some(second));
    // The old token no longer matches.
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", &format!("{token}\n{text}"))),
        err("PolicyAdminTokenException", "Token mismatch")
    );
    assert_eq!(
        classify(t.call("policy.Replace", "30-user", "any\n")),
        Ok(String::new())
    );
    assert_eq!(t.read("30-user.policy").as_deref(), Some(""));
    // No temporary file is left behind.
    assert_eq!(
        t.snapshot().keys().cloned().collect::<Vec<_>>(),
        ["30-user.policy"]
    );
}

#[test]
fn a_broken_policy_never_goes_live() {
    let t = Tree::new();
    let good = "svc * @anyvm @anyvm deny\n";
    t.write("30-user.policy", good);
    let before = t.snapshot();
    let dir = t.policy_dir().display().to_string();
    for (payload, reason) in [
        (
            "any\nsvc * @anyvm @anyvm allow bad\n".to_owned(),
            format!("{dir}/30-user.policy:1: invalid action parameter syntax: 'bad'"),
        ),
        (
            "any\n# fine\nsvc * work\n".to_owned(),
            format!("{dir}/30-user.policy:2: wrong number of fields"),
        ),
        (
            "any\n!include include/missing\n".to_owned(),
            format!("{dir}/30-user.policy:1: not a file: {dir}/include/missing"),
        ),
        (
            "any\n!bogus\n".to_owned(),
            format!("{dir}/30-user.policy:1: invalid directive"),
        ),
    ] {
        let result = classify(t.call("policy.Replace", "30-user", &payload));
        let Err((class, message)) = result else {
            panic!("{payload:?} was accepted");
        };
        assert_eq!(class, "PolicyAdminSyntaxException", "{payload:?}");
        assert_eq!(
            message,
            format!("Policy change validation failed: {reason}"),
            "{payload:?}"
        );
        assert_eq!(t.snapshot(), before, "{payload:?} changed the tree");
    }
    // Another file's error blocks every change too (as in Qubes: the whole
    // directory is validated).
    t.write("10-broken.policy", "nonsense\n");
    assert!(matches!(
        t.call(
            "policy.Replace",
            "30-user",
            "any\nsvc * @anyvm @anyvm allow\n"
        ),
        Err(AdminError::Syntax(_))
    ));
    assert_eq!(t.read("30-user.policy").as_deref(), Some(good));
    // Not UTF-8: refused (Qubes: an internal error).
    let mut bytes = b"any\nsvc * @anyvm @anyvm allow # ".to_vec();
    bytes.push(0xff);
    fs::remove_file(t.policy_dir().join("10-broken.policy")).unwrap();
    let admin = t.admin();
    assert!(matches!(
        admin.handle_request("policy.Replace", "30-user", &bytes),
        Err(AdminError::Protocol(m)) if m.contains("UTF-8")
    ));
    assert_eq!(t.read("30-user.policy").as_deref(), Some(good));
}

#[test]
fn upper_case_policy_names_are_refused_include_names_are_not() {
    let t = Tree::new();
    assert!(matches!(
        t.call("policy.Replace", "Upper", "new\n"),
        Err(AdminError::InvalidFileName(_))
    ));
    assert!(t.read("Upper.policy").is_none());
    assert_eq!(
        classify(t.call("policy.include.Replace", "Upper", "new\n")),
        Ok(String::new())
    );
    assert_eq!(t.read("include/Upper").as_deref(), Some(""));
}

#[test]
fn include_files_are_checked_in_the_context_they_are_included_from() {
    let t = Tree::new();
    let dir = t.policy_dir().display().to_string();
    // Not included anywhere: anything goes (as in Qubes).
    assert_eq!(
        classify(t.call(
            "policy.include.Replace",
            "full",
            "new\nsvc * @anyvm @anyvm deny\n"
        )),
        Ok(String::new())
    );
    assert_eq!(
        classify(t.call(
            "policy.include.Replace",
            "svc",
            "new\n@anyvm @anyvm allow\n"
        )),
        Ok(String::new())
    );
    assert_eq!(
        classify(t.call(
            "policy.Replace",
            "50-inc",
            "new\n!include include/full\n!include-service other * include/svc\n"
        )),
        Ok(String::new())
    );
    // Now `full` is read as a full policy and `svc` as a service file.
    assert_eq!(
        classify(t.call(
            "policy.include.Replace",
            "full",
            "any\n@anyvm @anyvm allow\n"
        )),
        err(
            "PolicyAdminSyntaxException",
            &format!(
                "Policy change validation failed: {dir}/include/full:1: wrong number of fields"
            )
        )
    );
    let r = classify(t.call(
        "policy.include.Replace",
        "svc",
        "any\nsvc * @anyvm @anyvm allow\n",
    ));
    assert!(
        matches!(&r, Err((c, m)) if c == "PolicyAdminSyntaxException"
            && m.starts_with(&format!("Policy change validation failed: {dir}/include/svc:1: "))),
        "{r:?}"
    );
    // Files still included cannot be removed.
    for name in ["full", "svc"] {
        assert_eq!(
            classify(t.call("policy.include.Remove", name, "any")),
            err(
                "PolicyAdminSyntaxException",
                &format!(
                    "Policy change validation failed: {dir}/50-inc.policy:{}: including a file that will be removed: {dir}/include/{name}",
                    if name == "full" { 1 } else { 2 }
                )
            )
        );
    }
    // Remove the includer, then the includes.
    assert_eq!(
        classify(t.call("policy.Remove", "50-inc", "any")),
        Ok(String::new())
    );
    assert_eq!(
        classify(t.call("policy.include.Remove", "full", "any")),
        Ok(String::new())
    );
    assert_eq!(
        classify(t.call("policy.include.List", "", "")),
        Ok("svc\n".into())
    );
}

#[test]
fn remove_tokens_and_missing_files() {
    let t = Tree::new();
    t.write("30-user.policy", "x\n");
    let dir = t.policy_dir().display().to_string();
    // The payload is the token alone, no newline.
    assert_eq!(
        classify(t.call("policy.Remove", "30-user", "any\n")),
        err("PolicyAdminProtocolException", "Unrecognized token")
    );
    assert_eq!(
        classify(t.call("policy.Remove", "30-user", "new")),
        err(
            "PolicyAdminTokenException",
            "File exists but token is 'new'"
        )
    );
    assert_eq!(
        classify(t.call("policy.Remove", "30-user", "sha256:00")),
        err("PolicyAdminTokenException", "Token mismatch")
    );
    assert_eq!(
        classify(t.call("policy.Remove", "nope", "any")),
        err(
            "PolicyAdminFileNotFoundException",
            &format!("Not found: {dir}/nope.policy")
        )
    );
    assert_eq!(
        classify(t.call("policy.Remove", "nope", "new")),
        err(
            "PolicyAdminFileNotFoundException",
            &format!("Not found: {dir}/nope.policy")
        )
    );
    // Removing a broken file is allowed (the result is valid).
    let token = compute_token(b"x\n");
    assert_eq!(
        classify(t.call("policy.Remove", "30-user", &token)),
        Ok(String::new())
    );
    assert!(t.read("30-user.policy").is_none());
}

#[test]
fn get_files_lists_where_a_service_has_rules() {
    let t = Tree::new();
    t.write(
        "30-a.policy",
        "svc * @anyvm @anyvm deny\nother * @anyvm @anyvm deny\n",
    );
    t.write(
        "40-b.policy",
        "* * @anyvm @anyvm deny\n!include include/inc\n",
    );
    t.write(
        "50-c.policy",
        "other * @anyvm @anyvm deny\n!include-service svc * include/svc\n",
    );
    t.write("include/inc", "svc +x @anyvm @anyvm allow\n");
    t.write("include/svc", "@anyvm @anyvm allow\n");
    t.write("60-compat.policy", "!compat-4.0\n");
    let legacy = t.dir.path().join("legacy");
    fs::write(legacy.join("svc"), "@anyvm @anyvm deny\n").unwrap();
    let legacy_file = fs::canonicalize(legacy.join("svc")).unwrap();
    assert_eq!(
        classify(t.call("policy.GetFiles", "svc", "")),
        Ok(format!("30-a\n40-b\ninc\nsvc\n{}\n", legacy_file.display()))
    );
    assert_eq!(
        classify(t.call("policy.GetFiles", "nothing", "")),
        Ok("40-b\n".into())
    );
    assert_eq!(
        classify(t.call("policy.GetFiles", "", "")),
        err("PolicyAdminProtocolException", "Service cannot be empty.")
    );
    assert_eq!(
        classify(t.call("policy.GetFiles", "a+b", "")),
        err(
            "PolicyAdminProtocolException",
            "Service 'a+b' contains invalid characters: ('+',)"
        )
    );
    t.write("70-bad.policy", "garbage\n");
    assert!(matches!(
        t.call("policy.GetFiles", "svc", ""),
        Err(AdminError::Internal(_))
    ));
}

fn program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qubes-policy-admin"))
}

fn run_program(t: &Tree, full_name: Option<&str>, payload: &[u8]) -> (Vec<u8>, String, i32) {
    let mut cmd = Command::new(program());
    cmd.env_clear()
        .env("QREXEC_POLICY_DIR", t.dir.path().join("policy.d"))
        .env("QREXEC_LEGACY_POLICY_PATH", t.dir.path().join("legacy"))
        .env("QREXEC_POLICY_ADMIN_LOG", t.dir.path().join("admin.log"))
        .env("QREXEC_REMOTE_DOMAIN", "admin-vm")
        .arg("ignored-argument")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(name) = full_name {
        cmd.env("QREXEC_SERVICE_FULL_NAME", name);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.stdout,
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn program_output_exit_codes_and_log() {
    let t = Tree::new();
    let (out, stderr, code) = run_program(
        &t,
        Some("policy.Replace+30-user"),
        b"new\nsvc * @anyvm @anyvm deny\n",
    );
    assert_eq!((out.as_slice(), stderr.as_str(), code), (&b""[..], "", 0));
    let (out, stderr, code) = run_program(&t, Some("policy.Get+30-user"), b"");
    assert_eq!(code, 0, "{stderr}");
    assert!(out.ends_with(b"\nsvc * @anyvm @anyvm deny\n"));
    let (out, stderr, code) =
        run_program(&t, Some("policy.Replace+30-user"), b"any\nsvc * @anyvm\n");
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let dir = t.policy_dir().display().to_string();
    assert_eq!(
        stderr,
        format!(
            "PolicyAdminSyntaxException Policy change validation failed: {dir}/30-user.policy:1: wrong number of fields"
        )
    );
    // An internal error: the policy directory is missing.
    let moved = t.dir.path().join("moved");
    fs::rename(t.policy_dir(), &moved).unwrap();
    let log = t.dir.path().join("admin.log").display().to_string();
    let (_, stderr, code) = run_program(&t, Some("policy.List"), b"");
    assert!(!t.dir.path().join("policy.d").exists());
    fs::rename(&moved, t.dir.path().join("policy.d")).unwrap();
    assert_eq!(code, 2);
    assert_eq!(
        stderr,
        format!("Internal error. See '{log}' in dom0 for details.")
    );
    let (_, _, code) = run_program(&t, None, b"");
    assert_eq!(code, 2);
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
    // "DATE TIME,ms message"
    let messages: Vec<&str> = lines.iter().map(|l| l.split_once(' ').unwrap().1).collect();
    assert_eq!(messages.len(), 5, "{text}");
    assert_eq!(messages[0], "policy.Replace+30-user (admin-vm)");
    assert_eq!(messages[1], "policy.Get+30-user (admin-vm)");
    assert!(messages[2].starts_with(
        "policy.Replace+30-user (admin-vm): error: Policy change validation failed: "
    ));
    assert!(messages[3].starts_with("policy.List+ (admin-vm): exception: "));
}

// ---------------------------------------------------------------------
// Differential: the same requests through Qubes' PolicyAdmin.

fn reference_tarball() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/qubes-core-qrexec.tar.gz")
}

const DRIVER: &str = r#"
import base64, json, sys
sys.path.insert(0, sys.argv[1])
from qrexec.policy.admin import PolicyAdmin, PolicyAdminException
admin = PolicyAdmin(sys.argv[2])
out = []
for service, arg, payload in json.load(open(sys.argv[3])):
    try:
        r = admin.handle_request(service, arg, base64.b64decode(payload))
        out.append({"ok": base64.b64encode(r or b"").decode()})
    except PolicyAdminException as e:
        out.append({"class": type(e).__name__, "message": str(e)})
    except Exception as e:
        out.append({"class": "", "message": "internal"})
print(json.dumps(out))
"#;

fn seed(t: &Tree) {
    t.write(
        "10-base.policy",
        "base * @anyvm @anyvm deny\n# comment\r\n\n",
    );
    t.write("include/existing", "svc * @anyvm @anyvm deny\n");
    t.write("README", "not a policy\n");
    symlink("/etc/passwd", t.policy_dir().join("include/outside")).unwrap();
}

/// The request sequence: every service, good and malformed.
fn requests(token_of_30: &str) -> Vec<(String, String, Vec<u8>)> {
    let r = |s: &str, a: &str, p: &str| (s.to_owned(), a.to_owned(), p.as_bytes().to_vec());
    vec![
        r("policy.List", "", ""),
        r("policy.List", "x", ""),
        r("policy.List", "", "p"),
        r("policy.include.List", "", ""),
        r("policy.Get", "", ""),
        r("policy.Get", "a.b", ""),
        r("policy.Get", "a b", ""),
        r("policy.Get", "x/y", ""),
        r("policy.Get", "nope", ""),
        r("policy.Get", "10-base", ""),
        r("policy.Get", "10-base", "payload"),
        r("policy.include.Get", "outside", ""),
        r("policy.include.Get", "existing", ""),
        r("policy.Unknown", "", ""),
        r(
            "policy.Replace",
            "30-user",
            "new\nsvc * @anyvm @anyvm allow\n",
        ),
        r(
            "policy.Replace",
            "30-user",
            "new\nsvc * @anyvm @anyvm allow\n",
        ),
        r("policy.Replace", "30-user", "sha256:bad\nx\n"),
        r("policy.Replace", "30-user", "bogus\n"),
        r("policy.Replace", "30-user", "any"),
        r("policy.Replace", "30-user", ""),
        r(
            "policy.Replace",
            "30-user",
            &format!("{token_of_30}\nsvc * work @anyvm allow target=dom0\n"),
        ),
        r(
            "policy.Replace",
            "40-bad",
            "new\nsvc * @anyvm @anyvm allow bad\n",
        ),
        r("policy.Replace", "40-bad", "new\nsvc * @anyvm\n"),
        r(
            "policy.Replace",
            "40-bad",
            "new\n!include include/missing\n",
        ),
        r("policy.Replace", "40-bad", "new\n!include-dir include\n"),
        r("policy.Replace", "40-bad", "new\n!include\n"),
        r("policy.Replace", "40-bad", "new\n!nonsense\n"),
        r(
            "policy.Replace",
            "40-bad",
            "new\nsvc * @anyvm @tag: allow\n",
        ),
        r(
            "policy.Replace",
            "40-bad",
            "new\nsvc+ * @anyvm @anyvm allow\n",
        ),
        r(
            "policy.include.Replace",
            "inc1",
            "new\nsvc * @anyvm @anyvm deny\n",
        ),
        r("policy.Replace", "50-inc", "new\n!include include/inc1\n"),
        r(
            "policy.include.Replace",
            "inc1",
            "any\n@anyvm @anyvm allow\n",
        ),
        r("policy.include.Remove", "inc1", "any"),
        r(
            "policy.Replace",
            "60-svc",
            "new\n!include-service svc2 * include/inc2\n",
        ),
        r(
            "policy.include.Replace",
            "inc2",
            "new\n@anyvm @anyvm allow\n",
        ),
        r(
            "policy.Replace",
            "60-svc",
            "new\n!include-service svc2 * include/inc2\n",
        ),
        r(
            "policy.include.Replace",
            "inc2",
            "any\nsvc2 * @anyvm @anyvm allow\n",
        ),
        r(
            "policy.include.Replace",
            "inc2",
            "any\n$anyvm $anyvm allow,target=dom0\n",
        ),
        r("policy.include.Replace", "inc2", "any\n$include:existing\n"),
        r("policy.include.Replace", "outside", "any\n"),
        r("policy.GetFiles", "svc", ""),
        r("policy.GetFiles", "svc2", ""),
        r("policy.GetFiles", "base", ""),
        r("policy.GetFiles", "", ""),
        r("policy.GetFiles", "a+b", ""),
        r("policy.GetFiles", "svc", "p"),
        r("policy.Remove", "30-user", "any\n"),
        r("policy.Remove", "30-user", "new"),
        r("policy.Remove", "nope", "any"),
        r("policy.Remove", "nope", "sha256:x"),
        r("policy.Remove", "50-inc", "any"),
        r("policy.include.Remove", "inc1", "any"),
        r("policy.Replace", "70-empty", "new\n"),
        r("policy.Replace", "90-broken", "any\nnot a rule\n"),
        r("policy.include.Replace", "existing", "any\nbroken\n"),
        r(
            "policy.Replace",
            "80-crlf",
            "new\r\nsvc * @anyvm @anyvm deny\r\n",
        ),
        r(
            "policy.Replace",
            "80-crlf",
            "new\nsvc * @anyvm @anyvm deny\r\n",
        ),
        r("policy.List", "", ""),
        r("policy.include.List", "", ""),
    ]
}

#[test]
fn same_answers_as_qubes_policy_admin() {
    let token = compute_token(b"svc * @anyvm @anyvm allow\n");
    differential(seed, &requests(&token));
}

#[test]
fn same_first_error_as_qubes_with_a_broken_file_on_disk() {
    let r = |s: &str, a: &str, p: &str| (s.to_owned(), a.to_owned(), p.as_bytes().to_vec());
    differential(
        |t| {
            seed(t);
            t.write("20-broken.policy", "svc * @anyvm\n");
        },
        &[
            // Qubes reads the files on disk first, then the proposed one.
            r("policy.Replace", "05-new", "new\nnot a rule\n"),
            r("policy.Replace", "30-ok", "new\nsvc * @anyvm @anyvm deny\n"),
            r("policy.Replace", "20-broken", "any\nstill broken\n"),
            r("policy.Remove", "10-base", "any"),
            r(
                "policy.Replace",
                "20-broken",
                "any\nsvc * @anyvm @anyvm deny\n",
            ),
            r("policy.Replace", "05-new", "new\nnot a rule\n"),
            r("policy.List", "", ""),
        ],
    );
}

/// xorshift64*: a small deterministic generator for the random sequence.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Lines a policy or include file may get: valid and broken rules in both
/// formats, every directive, comments.
const LINES: &[&str] = &[
    "svc * @anyvm @anyvm allow",
    "svc * @anyvm @anyvm deny",
    "svc2 +arg work @default allow target=vault",
    "* * @anyvm @adminvm deny",
    "svc * @anyvm",
    "svc * @anyvm @anyvm allow bogus=1",
    "@anyvm @anyvm allow",
    "$anyvm $anyvm allow,target=dom0",
    "!include include/inc",
    "!include include/missing",
    "!include-service svc2 * include/inc2",
    "!include-service svc2 * include/inc",
    "!include-dir include",
    "!compat-4.0 extra",
    "!nonsense",
    "# comment",
    "",
];

/// `count` random requests over a small set of names, tokens and contents,
/// with many of them malformed. Tokens of the contents the generator can
/// produce are offered, so some `sha256:` tokens match.
fn random_requests(seed: u64, count: usize) -> Vec<(String, String, Vec<u8>)> {
    let mut rng = Rng(seed | 1);
    let services = [
        "policy.List",
        "policy.include.List",
        "policy.Get",
        "policy.include.Get",
        "policy.Replace",
        "policy.Replace",
        "policy.include.Replace",
        "policy.include.Replace",
        "policy.Remove",
        "policy.include.Remove",
        "policy.GetFiles",
        "policy.Bogus",
    ];
    let names = [
        "30-a", "40-b", "inc", "inc2", "outside", "nope", "", "a.b", "a b", "x+y", "..", "svc",
        "svc2",
    ];
    let mut contents: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let service = rng.pick(&services);
        let mut arg = rng.pick(&names).to_owned();
        if (service == "policy.List" || service == "policy.include.List") && rng.below(5) != 0 {
            arg.clear();
        }
        let mut payload = String::new();
        let token = |rng: &mut Rng, contents: &[String]| -> String {
            match rng.below(6) {
                0 | 1 => "any".into(),
                2 => "new".into(),
                3 => "bogus".into(),
                _ if contents.is_empty() => "sha256:00".into(),
                _ => compute_token(contents[rng.below(contents.len())].as_bytes()),
            }
        };
        match service {
            "policy.Replace" | "policy.include.Replace" => {
                let mut text = String::new();
                for _ in 0..rng.below(4) {
                    text.push_str(rng.pick(LINES));
                    text.push_str(if rng.below(8) == 0 { "\r\n" } else { "\n" });
                }
                payload = token(&mut rng, &contents);
                if rng.below(12) != 0 {
                    payload.push('\n');
                    payload.push_str(&text);
                }
                contents.push(text);
            }
            "policy.Remove" | "policy.include.Remove" => {
                payload = token(&mut rng, &contents);
                if rng.below(10) == 0 {
                    payload.push('\n');
                }
            }
            _ if rng.below(15) == 0 => payload = "unexpected".into(),
            _ => {}
        }
        out.push((service.to_owned(), arg, payload.into_bytes()));
    }
    out
}

#[test]
fn random_requests_answered_as_qubes_does() {
    let seed = std::env::var("POLICY_ADMIN_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0a11);
    println!("seed {seed:#x} (POLICY_ADMIN_DIFF_SEED)");
    differential(seed_random, &random_requests(seed, 600));
}

fn seed_random(t: &Tree) {
    seed(t);
    t.write("include/inc", "svc * @anyvm @anyvm deny\n");
    t.write("include/inc2", "@anyvm @anyvm deny\n");
    t.write(
        "20-inc.policy",
        "!include include/inc\n!include-service svc2 * include/inc2\n",
    );
}

fn differential(seed: impl Fn(&Tree), requests: &[(String, String, Vec<u8>)]) {
    let tarball = reference_tarball();
    let python = Command::new("python3").arg("--version").output();
    if !tarball.is_file() || python.is_err() {
        println!(
            "skipped: needs {} and python3 (Qubes' PolicyAdmin is the reference)",
            tarball.display()
        );
        return;
    }
    let reference = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(reference.path())
        .arg("qubes-core-qrexec/qrexec")
        .status()
        .unwrap();
    assert!(status.success(), "cannot unpack {}", tarball.display());

    let ours = Tree::new();
    let theirs = Tree::new();
    seed(&ours);
    seed(&theirs);

    let json: Vec<serde_json::Value> = requests
        .iter()
        .map(|(s, a, p)| serde_json::json!([s, a, base64(p)]))
        .collect();
    let request_file = reference.path().join("requests.json");
    fs::write(&request_file, serde_json::to_string(&json).unwrap()).unwrap();
    let driver = reference.path().join("driver.py");
    fs::write(&driver, DRIVER).unwrap();
    let out = Command::new("python3")
        .arg(&driver)
        .arg(reference.path().join("qubes-core-qrexec"))
        .arg(theirs.policy_dir())
        .arg(&request_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Qubes' PolicyAdmin failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers.len(), requests.len());

    let admin = ours.admin();
    let our_dir = ours.policy_dir().display().to_string();
    let their_dir = theirs.policy_dir().display().to_string();
    let mut differences = Vec::new();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for ((service, arg, payload), theirs) in requests.iter().zip(&answers) {
        let mine = match admin.handle_request(service, arg, payload) {
            Ok(r) => serde_json::json!({"ok": base64(&r.unwrap_or_default())}),
            Err(e) if e.is_internal() => serde_json::json!({"class": "", "message": "internal"}),
            Err(e) => serde_json::json!({
                "class": e.class_name(),
                "message": e.message().replace(&our_dir, "DIR"),
            }),
        };
        let mut theirs = theirs.clone();
        if let Some(m) = theirs.get_mut("message") {
            *m = m.as_str().unwrap().replace(&their_dir, "DIR").into();
        }
        let outcome = match theirs.get("class").and_then(|c| c.as_str()) {
            None => "ok",
            Some("") => "internal error",
            Some(class) => class,
        };
        *tally.entry(outcome.to_owned()).or_default() += 1;
        // Documented: an include cycle is Qubes' RecursionError (an
        // internal error); ours is a refused change naming the line.
        let include_cycle = theirs["class"] == ""
            && mine["class"] == "PolicyAdminSyntaxException"
            && mine["message"]
                .as_str()
                .is_some_and(|m| m.contains("includes nested deeper than"));
        if include_cycle {
            *tally
                .entry("include cycle (documented)".into())
                .or_default() += 1;
        }
        if mine != theirs && !include_cycle {
            differences.push(format!(
                "{service}+{arg} {:?}:\n  ours:   {mine}\n  Qubes': {theirs}",
                String::from_utf8_lossy(payload)
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} requests differ:\n{}",
        differences.len(),
        requests.len(),
        differences.join("\n")
    );
    assert_eq!(
        ours.snapshot(),
        theirs.snapshot(),
        "the trees differ afterwards"
    );
    println!(
        "{} requests, all answered as Qubes' PolicyAdmin does: {tally:?}",
        requests.len()
    );
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
