//! qubes.OpenInVM end to end: `qvm-open-in-vm` / `qvm-open-in-dvm` through a
//! stand-in `qrexec-client-vm` that pipes `qopen-in-vm` into the far side's
//! service (our `vm-file-editor`, or a hostile script), with the exit code
//! rule of ours and Qubes' (the service's when non-zero, else the local
//! program's); and hostile request streams straight into `vm-file-editor`.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // reason: tests; a panic is a test failure

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qubes_filecopy::openinvm::{NAME_FIELD_LEN, encode_name};

struct Setup {
    tmp: tempfile::TempDir,
    client: PathBuf,
    /// The far side's $TMPDIR (must be empty after every call).
    far_tmp: PathBuf,
    log: PathBuf,
}

/// The stand-in `qrexec-client-vm -- TARGET SERVICE LOCAL...`: runs
/// `$FAKE_SERVICE` (default: our vm-file-editor) as the service with
/// QREXEC_REMOTE_DOMAIN=client1 and TMPDIR=$FAKE_TMP, piped both ways into
/// LOCAL, and logs "TARGET SERVICE".
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let client = tmp.path().join("qrexec-client-vm");
    std::fs::write(
        &client,
        format!(
            "#!/bin/sh\n[ \"$1\" = -- ] || exit 98\necho \"$2 $3\" >> \"$FAKE_LOG\"\nshift 3\n\
             dir=$(mktemp -d)\nmkfifo \"$dir/f\"\n\
             {{ QREXEC_REMOTE_DOMAIN=client1 TMPDIR=\"$FAKE_TMP\" ${{FAKE_SERVICE:-{}}} < \"$dir/f\"; echo $? > \"$dir/s\"; }} | \"$@\" > \"$dir/f\"\n\
             local=$?\nremote=$(cat \"$dir/s\")\nrm -rf \"$dir\"\n\
             [ \"$remote\" != 0 ] && exit \"$remote\"\nexit \"$local\"\n",
            env!("CARGO_BIN_EXE_vm-file-editor")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let far_tmp = tmp.path().join("far-tmp");
    std::fs::create_dir(&far_tmp).unwrap();
    let log = tmp.path().join("log");
    Setup {
        tmp,
        client,
        far_tmp,
        log,
    }
}

impl Setup {
    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// `qvm-open-in-dvm FILE` (or `qvm-open-in-vm VM FILE`) with the far
    /// side's opening program `editor` and extra environment.
    fn open(&self, args: &[&Path], dvm: bool, editor: &str, env: &[(&str, &str)]) -> Output {
        let bin = if dvm {
            env!("CARGO_BIN_EXE_qvm-open-in-dvm")
        } else {
            env!("CARGO_BIN_EXE_qvm-open-in-vm")
        };
        let mut command = Command::new(bin);
        command
            .args(args)
            .env("QREXEC_CLIENT_VM", &self.client)
            .env("QOPEN_IN_VM", env!("CARGO_BIN_EXE_qopen-in-vm"))
            .env("QUBES_OPEN_IN_VM_COMMAND", editor)
            .env("FAKE_TMP", &self.far_tmp)
            .env("FAKE_LOG", &self.log)
            .env_remove("FAKE_SERVICE")
            .env_remove("QUBES_OPEN_IN_VM_MAX_BYTES");
        for (k, v) in env {
            command.env(k, v);
        }
        output_retrying_etxtbsy(&mut command)
    }

    /// Files in the test directory other than the stand-in's own.
    fn leftovers(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    fn far_side_is_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.far_tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left in the far side's TMPDIR: {left:?}");
    }
}

/// Run `command`; again when a script this test just wrote could not be
/// executed yet ("Text file busy": another thread's child, between its fork
/// and exec, still held the script's write descriptor).
fn output_retrying_etxtbsy(command: &mut Command) -> Output {
    for _ in 0..20 {
        match command.output() {
            Err(e) if e.raw_os_error() == Some(26) => {}
            Ok(out) if !String::from_utf8_lossy(&out.stderr).contains("Text file busy") => {
                return out;
            }
            Ok(_) => {}
            Err(e) => panic!("cannot run {command:?}: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{command:?}: Text file busy 20 times");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_edited_file_comes_back_and_replaces_the_original() {
    let s = setup();
    let file = s.file("notes.txt", b"hello world\n");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    let out = s.open(&[&file], true, "sed -i s/world/disposable/", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"hello disposable\n");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "mode kept");
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&meta),
        ino,
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(s.leftovers(), Vec::<String>::new());
    s.far_side_is_clean();
    // qvm-open-in-vm names its target; the editor saw a safe name.
    let odd = s.file("we ird\u{7}.txt", b"abc");
    let out = s.open(
        &[Path::new("work"), &odd],
        false,
        "case \"$1\" in */we_ird_.txt) echo renamed-ok > \"$1\";; esac; true",
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&odd).unwrap(), b"renamed-ok\n");
    // Through a symbolic link: the target is replaced, the link stays.
    let target_dir = s.tmp.path().join("real");
    std::fs::create_dir(&target_dir).unwrap();
    std::fs::write(target_dir.join("t.txt"), b"via link\n").unwrap();
    let link = s.tmp.path().join("link.txt");
    std::os::unix::fs::symlink("real/t.txt", &link).unwrap();
    let out = s.open(&[&link], true, "sed -i s/via/edited-via/", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    assert_eq!(
        std::fs::read(target_dir.join("t.txt")).unwrap(),
        b"edited-via link\n"
    );
    assert_eq!(std::fs::read_dir(&target_dir).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(&s.log).unwrap(),
        "@dispvm qubes.OpenInVM\nwork qubes.OpenInVM\n@dispvm qubes.OpenInVM\n"
    );
}

#[test]
fn an_unchanged_file_is_left_alone() {
    let s = setup();
    let file = s.file("a.txt", b"same\n");
    let before = std::fs::metadata(&file).unwrap();
    // Only looked at: nothing comes back.
    let out = s.open(&[&file], true, "cat >/dev/null", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Rewritten with the same bytes: sent back, found identical, left.
    let out = s.open(&[&file], true, "printf 'same\\n' >", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (after.ino(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.mtime(), before.mtime_nsec())
    );
    assert_eq!(s.leftovers(), Vec::<String>::new());
    s.far_side_is_clean();
}

#[test]
fn a_failing_editor_leaves_the_file_and_reports() {
    let s = setup();
    let file = s.file("a.txt", b"precious\n");
    // The editor changes the file, then fails: nothing may come back.
    let out = s.open(&[&file], true, "echo ruined > \"$1\"; exit 3; :", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("vm-file-editor: Unable to handle mimetype of the requested file")
            && err.contains("exit status: 3"),
        "{err}"
    );
    assert!(err.contains("is left unchanged"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious\n");
    assert_eq!(s.leftovers(), Vec::<String>::new());
    s.far_side_is_clean();
}

#[test]
fn view_only_never_replaces() {
    let s = setup();
    let file = s.file("v.txt", b"look\n");
    let out = s.open(
        &[Path::new("--view-only"), &file],
        true,
        // The view-only file is read-only; the opener makes a change anyway.
        "[ \"$(stat -c %a \"$1\")\" = 400 ] && chmod u+w \"$1\" && echo changed > \"$1\"",
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"look\n");
    s.far_side_is_clean();
}

#[test]
fn a_file_changed_here_meanwhile_is_not_overwritten() {
    let s = setup();
    let file = s.file("race.txt", b"v1\n");
    let local = file.display().to_string();
    // The far side's editor stands for the user editing locally at the same
    // time (the stand-in shares our filesystem).
    let editor = format!("echo local-edit > '{local}'; echo remote-edit >");
    let out = s.open(&[&file], true, &editor, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"local-edit\n");
    let kept = s.leftovers();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(s.tmp.path().join(&kept[0])).unwrap(),
        b"remote-edit\n"
    );
    assert!(stderr(&out).contains("the edited file has been saved to"));
}

#[test]
fn usage_errors_are_qubes_ones() {
    let s = setup();
    let out = s.open(&[s.tmp.path()], true, "true", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is a directory."));
    let out = s.open(&[Path::new("/nonexistent/x")], true, "true", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is not a valid file or URL."));
    let out = s.open(&[Path::new("https://example.org/")], true, "true", &[]);
    let _ = out; // a URL goes to qubes.OpenURL
    assert!(
        std::fs::read_to_string(&s.log)
            .unwrap()
            .contains("@dispvm qubes.OpenURL")
    );
    // A disposable opening in a disposable refuses (no way to prompt).
    let file = s.file("x", b"x");
    let out = s.open(
        &[&file],
        true,
        "true",
        &[("QREXEC_SERVICE_FULL_NAME", "qubes.OpenInVM+")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("infinite VM creation loop"));
}

/// Hostile far sides, as services in place of vm-file-editor.
fn hostile(s: &Setup, script: &str) -> String {
    let path = s.tmp.path().join("hostile-service");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

#[test]
fn hostile_answers_never_replace_the_file() {
    let s = setup();
    let file = s.file("doc.txt", b"original\n");
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        // More than the limit comes back.
        (
            "cat >/dev/null; head -c 5000 /dev/zero",
            &[("QUBES_OPEN_IN_VM_MAX_BYTES", "4096")],
            "larger than 4096 bytes",
        ),
        // Part of a file, then the service fails.
        (
            "cat >/dev/null; printf partial; exit 1",
            &[],
            "the call failed",
        ),
        // The far side dies with a signal.
        (
            "cat >/dev/null; printf x; kill -9 $$",
            &[],
            "the call failed",
        ),
    ];
    for (script, env, expected) in cases {
        let service = hostile(&s, script);
        let mut env = env.to_vec();
        env.push(("FAKE_SERVICE", &service));
        let out = s.open(&[&file], true, "true", &env);
        assert!(!out.status.success(), "{script}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{script}: {}",
            stderr(&out)
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"original\n", "{script}");
        assert_eq!(s.leftovers(), Vec::<String>::new(), "{script}");
    }
    // A far side that reads nothing: the send fails (the file is larger
    // than a pipe), the file stays.
    let big = s.file("big.bin", &vec![1u8; 1 << 20]);
    let service = hostile(&s, "exec 0<&-; sleep 0; printf replaced");
    let out = s.open(&[&big], true, "true", &[("FAKE_SERVICE", &service)]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("send file to the other qube"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&big).unwrap(), vec![1u8; 1 << 20]);
    assert_eq!(s.leftovers(), Vec::<String>::new());
}

fn field(name: &[u8]) -> Vec<u8> {
    let mut f = name.to_vec();
    f.resize(NAME_FIELD_LEN, 0);
    f
}

/// Run vm-file-editor on `stream` with an opener that leaves a mark.
fn editor_on(s: &Setup, stream: &[u8], env: &[(&str, &str)]) -> (Output, bool) {
    let mark = s.tmp.path().join("opened");
    let _ = std::fs::remove_file(&mark);
    let mut command = Command::new(env!("CARGO_BIN_EXE_vm-file-editor"));
    command
        .env("QREXEC_REMOTE_DOMAIN", "client1")
        .env("TMPDIR", &s.far_tmp)
        .env(
            "QUBES_OPEN_IN_VM_COMMAND",
            format!("touch '{}'; echo edited >", mark.display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = stream.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out, mark.exists())
}

#[test]
fn hostile_requests_are_refused_by_the_handler() {
    let s = setup();
    let with = |name: &[u8], body: &[u8]| [field(name), body.to_vec()].concat();
    let unterminated = vec![b'a'; NAME_FIELD_LEN + 10];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "slash",
            with(b"../../etc/passwd", b"x"),
            "filename contains /",
        ),
        (
            "absolute",
            with(b"/etc/passwd", b"x"),
            "filename contains /",
        ),
        ("dotdot", with(b"..", b"x"), "is not a file name"),
        ("empty", with(b"", b"x"), "is not a file name"),
        (
            "truncated",
            field(b"a.txt")[..100].to_vec(),
            "100 of 256 bytes",
        ),
        ("nothing", Vec::new(), "0 of 256 bytes"),
        ("unterminated", unterminated, "not NUL-terminated"),
        (
            "oversize",
            with(b"big", &[0u8; 3000]),
            "larger than 2048 bytes",
        ),
    ];
    for (what, stream, expected) in &cases {
        let (out, opened) = editor_on(&s, stream, &[("QUBES_OPEN_IN_VM_MAX_BYTES", "2048")]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{what}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{what}: nothing is sent back");
        assert!(!opened, "{what}: the opener must not run");
        s.far_side_is_clean();
    }
    // Control characters are replaced; the file opens and comes back.
    let (out, opened) = editor_on(&s, &with(b"a\x1b[2Jb\n.txt", b"data"), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(opened);
    assert_eq!(out.stdout, b"edited\n");
    s.far_side_is_clean();
    // A bad source qube name is refused before reading.
    let (out, _) = editor_on(&s, &with(b"a", b""), &[("QREXEC_REMOTE_DOMAIN", "../x")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Invalid remote domain name"));
    // What qopen-in-vm sends is what the handler takes.
    let (out, _) = editor_on(
        &s,
        &[&encode_name(b"/x/y/z.txt", false)[..], b"q"].concat(),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    s.far_side_is_clean();
}

#[test]
fn an_installed_front_end_runs_the_helper_of_its_prefix() {
    // The package's layout: PREFIX/bin/qvm-open-in-dvm runs PREFIX/qopen-in-vm.
    let s = setup();
    let prefix = s.tmp.path().join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    let front = prefix.join("bin/qvm-open-in-dvm");
    std::fs::copy(env!("CARGO_BIN_EXE_qvm-open-in-dvm"), &front).unwrap();
    let mark = s.tmp.path().join("helper-ran");
    let helper = prefix.join("qopen-in-vm");
    std::fs::write(&helper, format!("#!/bin/sh\ntouch '{}'\n", mark.display())).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = s.tmp.path().join("run-local");
    std::fs::write(&client, "#!/bin/sh\nshift 3\nexec \"$@\"\n").unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = s.file("h.txt", b"h");
    let out = output_retrying_etxtbsy(
        Command::new(&front)
            .arg(&file)
            .env("QREXEC_CLIENT_VM", &client)
            .env_remove("QOPEN_IN_VM"),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(mark.exists(), "PREFIX/qopen-in-vm was not run");
    assert_eq!(std::fs::read(&file).unwrap(), b"h");
}
