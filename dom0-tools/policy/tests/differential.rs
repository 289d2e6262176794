//! Differential test: our policy engine against Qubes' own Python policy
//! parser (qubes-core-qrexec 4.4.2, `qrexec/policy/parser.py`).
//!
//! Random systems (types, tags, `internal`, disposable templates, power
//! states, uuids), random policy trees in both formats (`policy.d/*.policy`
//! with `!include`, `!include-dir`, `!include-service` and `!compat-4.0`,
//! relative and absolute paths; legacy `/etc/qubes-rpc/policy`-style files
//! with `$include:`) using every token, and random requests (qube names,
//! uuids, `dom0`, `@adminvm`, `@default`, `@dispvm`, `@dispvm:…`, qubes that
//! do not exist, invalid tokens; normal, `--assume-yes-for-ask` and
//! `--just-evaluate`). Every request is decided by our engine (as a
//! library) and by Qubes' parser (through `tests/differential/driver.py`,
//! ours, which imports theirs; one Python process for the whole batch), and
//! result, target, user, autostart, requested_target, target_uuid, the
//! `ask` choices and default, and the deny `notify` flag are compared.
//! Load errors are compared too (both refuse, same first error).
//!
//! Qubes' package is unpacked at test time from
//! `../shared/reference/qubes-core-qrexec.tar.gz` beside the repository
//! (`QUBES_REFERENCE_DIR` overrides the folder) into the cargo target
//! directory; nothing of it is committed. Python 3.12 is found as
//! `POLICY_DIFF_PYTHON`, pyenv's `~root/.pyenv/versions/3.12*/bin/python3.12`,
//! or `python3.12` on `PATH`; the parser needs only the standard library.
//! Without either the test says why and passes without comparing (or
//! fails, if `POLICY_DIFF_REQUIRED` is set).
//!
//! `POLICY_DIFF_REQUESTS` (default 15 000) sets the number of requests,
//! `POLICY_DIFF_SEED` the seed (default fixed, so CI is reproducible; the
//! seed is printed). Figures are printed per result class (on standard
//! error, past the test harness's capture); `POLICY_DIFF_VERBOSE` adds
//! Qubes' answers counted by reason. Requests in worlds whose policy fails
//! to load are not counted as compared: there the load errors are compared
//! (both must refuse the policy with the same first error). Qubes'
//! exceptions count as denials (the call is refused); where Qubes denies,
//! `notify` and the logged reason must agree too.
//!
//! # Qubes behaviour we deliberately do not copy
//!
//! Where Qubes' result is an accident of its implementation, ours is the
//! safer one, and the comparison skips exactly those cases (counted and
//! printed). References are to qubes-core-qrexec at commit
//! b2822df6fc22e52dbaa721a25ba92040f342b8b6 (4.4.2).
//!
//! 1. *Loopback by uuid.* `AllowResolution.execute` refuses a call to the
//!    caller itself by comparing the texts `request.source == target`
//!    (`qrexec/policy/parser.py:783`), so `work` calling `uuid:<work's
//!    uuid>` (or dom0 calling `uuid:00000000-…`) is allowed and connected
//!    back to itself. We compare the qubes, and refuse
//!    (`loopback qrexec connection not supported`).
//! 2. *`@adminvm` survives an earlier deny in `ask` choices.* When
//!    collecting the choices of an `ask` without `target=`, Qubes expands
//!    the keyword `@adminvm` to itself (`AdminVM.expand`,
//!    `qrexec/policy/parser.py:489-490`), removes what deny rules expand to
//!    (`:1896`, where dom0 is `dom0`), and only then turns `@adminvm` into
//!    `dom0` (`:1910-1912`). So a rule `… @anyvm @adminvm allow` (or
//!    `target=@adminvm`) after a `… * deny` (or `dom0 deny`,
//!    `@type:AdminVM deny`) still offers dom0, and `--assume-yes-for-ask`
//!    then calls dom0, although a direct call to dom0 is denied; the other
//!    way round, an earlier `… @adminvm deny` does not remove a later
//!    `target=dom0`. We expand `@adminvm` to `dom0` at once, so the deny
//!    removes it either way. Skipped here:
//!    a policy that uses `@adminvm` as a target, where Qubes' answer
//!    differs from ours only by offering (or, assuming yes, calling) dom0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)] // reason: test code

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use qrexec_policy::{
    AskAnswer, AskQuestion, Confirm, Decision, Policy, PolicyPaths, Query, SystemInfo,
};
use serde_json::{Value, json};

const ADMIN_UUID: &str = "00000000-0000-0000-0000-000000000000";
const REQUESTS_PER_WORLD: usize = 50;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn uuid(&mut self) -> String {
        let a = self.next();
        let b = self.next();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

// ---------------------------------------------------------------- worlds

const NAMES: [&str; 9] = [
    "work",
    "personal",
    "vault",
    "sys-net",
    "untrusted",
    "dvm1",
    "dvm2",
    "tpl",
    "mgmt",
];
const TYPES: [&str; 4] = ["AppVM", "TemplateVM", "StandaloneVM", "DispVM"];
const TAGS: [&str; 3] = ["t1", "t2", "audio"];
const SERVICES: [&str; 3] = ["svc.A", "svc.B", "qubes.Filecopy"];
const ARGS: [&str; 3] = ["+", "+a1", "+a2"];

struct Qube {
    name: String,
    json: Value,
    uuid: String,
}

struct World {
    qubes: Vec<Qube>,
    /// Every token text useful in this world, by kind.
    names: Vec<String>,
    uuids: Vec<String>,
}

fn random_world(rng: &mut Rng) -> World {
    let count = 2 + rng.below(6);
    let mut names: Vec<String> = NAMES.iter().map(|s| (*s).to_owned()).collect();
    // shuffle, take `count`
    for i in (1..names.len()).rev() {
        let j = rng.below(i + 1);
        names.swap(i, j);
    }
    names.truncate(count);
    let mut qubes = Vec::new();
    let tags =
        |rng: &mut Rng| -> Vec<&str> { TAGS.iter().copied().filter(|_| rng.chance(35)).collect() };
    // dom0 first
    let dom0_tags = tags(rng);
    let mut all: Vec<String> = vec!["dom0".to_owned()];
    all.extend(names.iter().cloned());
    let power = ["Running", "Halted", "Paused"];
    for name in &all {
        let is_dom0 = name == "dom0";
        let uuid = if is_dom0 {
            ADMIN_UUID.to_owned()
        } else {
            rng.uuid()
        };
        let default_dispvm = if rng.chance(70) {
            Value::from(rng.pick(&all))
        } else {
            Value::Null
        };
        let json = json!({
            "type": if is_dom0 { "AdminVM".to_owned() } else { rng.pick(&TYPES).to_owned() },
            "tags": if is_dom0 { dom0_tags.clone() } else { tags(rng) },
            "template_for_dispvms": !is_dom0 && rng.chance(35),
            "default_dispvm": default_dispvm,
            "power_state": if is_dom0 { "Running" } else { rng.pick(&power) },
            "uuid": uuid,
            "internal": !is_dom0 && rng.chance(15),
        });
        qubes.push(Qube {
            name: name.clone(),
            json,
            uuid,
        });
    }
    let uuids = qubes.iter().map(|q| q.uuid.clone()).collect();
    World {
        qubes,
        names: all,
        uuids,
    }
}

impl World {
    fn system_json(&self) -> Value {
        let mut domains = serde_json::Map::new();
        for q in &self.qubes {
            domains.insert(q.name.clone(), q.json.clone());
        }
        Value::Object(domains)
    }

    fn system(&self) -> SystemInfo {
        let text = json!({ "domains": self.system_json() }).to_string();
        SystemInfo::from_json(Path::new("generated.json"), &text).unwrap()
    }

    /// A qube named one of the ways a policy or a request may name it.
    fn qube(&self, rng: &mut Rng) -> String {
        match rng.below(10) {
            0 => "ghost".to_owned(),
            1 => format!("uuid:{}", rng.uuid()),
            2..=4 => format!("uuid:{}", rng.pick(&self.uuids)),
            _ => rng.pick(&self.names),
        }
    }

    fn admin(&self, rng: &mut Rng) -> String {
        rng.pick(&["dom0", "@adminvm", &format!("uuid:{ADMIN_UUID}")])
            .to_owned()
    }

    fn dispvm(&self, rng: &mut Rng) -> String {
        match rng.below(4) {
            0 => "@dispvm".to_owned(),
            1 => format!("@dispvm:uuid:{}", rng.pick(&self.uuids)),
            2 => format!(
                "@dispvm:{}",
                if rng.chance(20) {
                    "ghost".to_owned()
                } else {
                    rng.pick(&self.names)
                }
            ),
            _ => format!("@dispvm:{}", rng.pick(&self.names)),
        }
    }

    fn source_token(&self, rng: &mut Rng) -> String {
        match rng.below(12) {
            0..=2 => "@anyvm".to_owned(),
            3 => "*".to_owned(),
            4 => self.admin(rng),
            5 => format!("@tag:{}", rng.pick(&TAGS)),
            6 => format!("@type:{}", rng.pick(&["AppVM", "AdminVM", "TemplateVM"])),
            7 => format!("@dispvm:{}", rng.pick(&self.names)),
            8 => format!("@dispvm:@tag:{}", rng.pick(&TAGS)),
            _ => self.qube(rng),
        }
    }

    fn target_token(&self, rng: &mut Rng) -> String {
        match rng.below(16) {
            0..=2 => "@anyvm".to_owned(),
            3 => "*".to_owned(),
            4 | 5 => self.admin(rng),
            6 => "@default".to_owned(),
            7 | 8 => self.dispvm(rng),
            9 => format!("@dispvm:@tag:{}", rng.pick(&TAGS)),
            10 => format!("@tag:{}", rng.pick(&TAGS)),
            11 => format!(
                "@type:{}",
                rng.pick(&["AppVM", "AdminVM", "DispVM", "TemplateVM"])
            ),
            _ => self.qube(rng),
        }
    }

    fn redirect_token(&self, rng: &mut Rng) -> String {
        match rng.below(8) {
            0 | 1 => self.admin(rng),
            2 | 3 => self.dispvm(rng),
            _ => self.qube(rng),
        }
    }

    /// `ACTION PARAM…` (new format: space separated).
    fn action(&self, rng: &mut Rng, target: &str) -> Vec<String> {
        let action = rng.pick(&["allow", "allow", "allow", "deny", "ask", "ask"]);
        let mut out = vec![action.to_owned()];
        if action != "deny" && (rng.chance(35) || (target == "@default" && action == "allow")) {
            out.push(format!("target={}", self.redirect_token(rng)));
        }
        if action == "ask" && rng.chance(40) {
            out.push(format!("default_target={}", self.redirect_token(rng)));
        }
        if action != "deny" && rng.chance(20) {
            out.push(format!("user={}", rng.pick(&["root", "user"])));
        }
        if rng.chance(20) {
            out.push(format!("notify={}", rng.pick(&["yes", "no"])));
        }
        if action != "deny" && rng.chance(25) {
            out.push(format!("autostart={}", rng.pick(&["yes", "no"])));
        }
        out
    }

    fn service_arg(&self, rng: &mut Rng) -> (String, String) {
        if rng.chance(10) {
            return ("*".to_owned(), "*".to_owned());
        }
        let service = rng.pick(&SERVICES).to_owned();
        let arg = if rng.chance(40) {
            "*".to_owned()
        } else {
            rng.pick(&ARGS).to_owned()
        };
        (service, arg)
    }

    fn new_rule(&self, rng: &mut Rng) -> String {
        let (service, arg) = self.service_arg(rng);
        let target = self.target_token(rng);
        let action = self.action(rng, &target);
        format!(
            "{service}\t{arg} {} {target}  {}",
            self.source_token(rng),
            action.join(" ")
        )
    }

    /// A 4.0-format line: `SOURCE TARGET ACTION[,PARAM…]` with `$` for `@`.
    fn old_rule(&self, rng: &mut Rng) -> String {
        let target = self.target_token(rng);
        let action = self.action(rng, &target);
        let line = format!("{} {target} {}", self.source_token(rng), action.join(","));
        line.replace('@', "$")
    }
}

/// Write a random policy tree under `dir`; returns the policy paths.
fn write_policy(world: &World, rng: &mut Rng, dir: &Path) -> PolicyPaths {
    let policy_d = dir.join("policy.d");
    let include = policy_d.join("include");
    let include_dir = policy_d.join("more");
    let legacy = dir.join("legacy");
    for d in [&policy_d, &include, &include_dir, &legacy] {
        fs::create_dir_all(d).unwrap();
    }
    let rules = |rng: &mut Rng, min: usize, spread: usize, old: bool| -> String {
        let n = min + rng.below(spread);
        let mut text = String::new();
        for _ in 0..n {
            match rng.below(12) {
                0 => text.push_str("# a comment\n"),
                1 => text.push('\n'),
                _ => {
                    let line = if old {
                        world.old_rule(rng)
                    } else {
                        world.new_rule(rng)
                    };
                    writeln!(text, "{line}").unwrap();
                }
            }
        }
        text
    };
    // included files (new format), an include-dir, legacy-format files
    let mut inc1 = rules(rng, 1, 5, false);
    if rng.chance(20) {
        // nested: resolved against the top-level file's directory
        inc1.push_str("!include include/inc2\n");
    }
    fs::write(include.join("inc1"), inc1).unwrap();
    // ignored: a dot file and another suffix
    fs::write(policy_d.join(".hidden.policy"), "garbage\n").unwrap();
    fs::write(policy_d.join("10-gen.policy.rpmnew"), "garbage\n").unwrap();
    fs::write(include.join("inc2"), rules(rng, 1, 5, false)).unwrap();
    fs::write(include.join("old1"), rules(rng, 1, 4, true)).unwrap();
    fs::write(include_dir.join("10-a.policy"), rules(rng, 0, 4, false)).unwrap();
    fs::write(include_dir.join("20-b.policy"), rules(rng, 0, 4, false)).unwrap();
    fs::write(include_dir.join("ignored.txt"), "garbage\n").unwrap();
    let mut legacy_files = Vec::new();
    for service in SERVICES {
        if rng.chance(50) {
            legacy_files.push(service.to_owned());
        }
        if rng.chance(30) {
            legacy_files.push(format!("{service}+a1"));
        }
    }
    fs::write(legacy.join("shared"), rules(rng, 1, 3, true)).unwrap();
    for name in &legacy_files {
        let mut text = rules(rng, 1, 4, true);
        if rng.chance(25) {
            let target = if rng.chance(50) {
                legacy.join("shared").display().to_string()
            } else {
                "shared".to_owned()
            };
            text = format!("$include:{target}\n{text}");
        }
        fs::write(legacy.join(name), text).unwrap();
    }
    // top-level files
    let files = 1 + rng.below(3);
    for f in 0..files {
        let mut text = String::new();
        let lines = 2 + rng.below(8);
        for _ in 0..lines {
            match rng.below(20) {
                0 => writeln!(text, "!include include/inc1").unwrap(),
                1 => writeln!(text, "!include {}", include.join("inc2").display()).unwrap(),
                2 => writeln!(text, "!include-dir more").unwrap(),
                3 => {
                    let (service, arg) = world.service_arg(rng);
                    let path = if rng.chance(50) {
                        "include/old1".to_owned()
                    } else {
                        include.join("old1").display().to_string()
                    };
                    writeln!(text, "!include-service {service} {arg} {path}").unwrap();
                }
                4 if f == 0 => writeln!(text, "!compat-4.0").unwrap(),
                _ => {
                    let line = world.new_rule(rng);
                    writeln!(text, "{line}").unwrap();
                }
            }
        }
        fs::write(policy_d.join(format!("{}-gen.policy", 10 + f * 10)), text).unwrap();
    }
    if rng.chance(6) {
        // a broken line somewhere: both must refuse the whole policy, with
        // the same first error
        let bad = rng.pick(&[
            "svc.A * @default @anyvm allow",
            "svc.A * @anyvm @anyvm allow target=@anyvm",
            "svc.A * @anyvm @anyvm ask default_target=*",
            "svc.A * @anyvm @anyvm permit",
            "svc.A * @anyvm @anyvm allow notify=maybe",
            "svc.A * @anyvm @anyvm allow user",
            "svc.A * @anyvm @anyvm deny target=work",
            "svc.A * @anyvm @anyvm allow user=a user=b",
            "svc.A * @anyvm @foo allow",
            "svc.A * @tag: @anyvm allow",
            "svc.A * @dispvm:@x @anyvm allow",
            "svc.A * @anyvm @anyvm",
            "svc.A a1 @anyvm @anyvm allow",
            "* +a1 @anyvm @anyvm allow",
            "svc/A * @anyvm @anyvm allow",
            "svc.A * @anyvm @default allow",
            "!include include/missing",
            "!include-dir nowhere",
            "!include",
            "!frobnicate x",
            "!compat-4.0 now",
        ]);
        let name = format!("{}-bad.policy", 5 + 10 * rng.below(4));
        fs::write(policy_d.join(name), format!("{bad}\n")).unwrap();
    }
    if rng.chance(40) {
        let source = world.source_token(rng);
        let target = rng.pick(&["@anyvm", "*", "@dispvm", "@default"]);
        let action = world.action(rng, target).join(" ");
        fs::write(
            policy_d.join("90-last.policy"),
            format!("* * {source} {target} {action}\n"),
        )
        .unwrap();
    }
    let mut policy_dirs = Vec::new();
    if rng.chance(30) {
        // a runtime directory read first: equal basenames hide the later
        // directory's file
        let run = dir.join("run.d");
        fs::create_dir_all(&run).unwrap();
        for _ in 0..1 + rng.below(2) {
            let name = rng.pick(&["10-gen.policy", "20-gen.policy", "15-run.policy"]);
            fs::write(run.join(name), rules(rng, 1, 5, false)).unwrap();
        }
        policy_dirs.push(run);
    }
    if rng.chance(2) {
        fs::write(policy_d.join("Bad.policy"), "\n").unwrap();
    }
    policy_dirs.push(policy_d);
    PolicyPaths {
        policy_dirs,
        legacy_dir: legacy,
    }
}

fn random_request(world: &World, rng: &mut Rng) -> Value {
    let source = match rng.below(40) {
        0 => "ghost".to_owned(),
        1 => format!("uuid:{}", rng.pick(&world.uuids)),
        _ => rng.pick(&world.names),
    };
    let target = match rng.below(20) {
        0 => String::new(),
        1 => "@default".to_owned(),
        2 | 3 => world.admin(rng),
        4..=6 => world.dispvm(rng),
        7 => rng
            .pick(&[
                "@anyvm",
                "*",
                "@tag:t1",
                "@foo",
                "@dispvm:@tag:t1",
                "@type:AppVM",
            ])
            .to_owned(),
        _ => world.qube(rng),
    };
    let service = if rng.chance(50) {
        rng.pick(&SERVICES).to_owned()
    } else {
        format!("{}{}", rng.pick(&SERVICES), rng.pick(&ARGS))
    };
    let mode = match rng.below(20) {
        0..=11 => "normal",
        12..=16 => "assume_yes",
        _ => "just_evaluate",
    };
    json!({"source": source, "target": target, "service": service, "mode": mode})
}

// ---------------------------------------------------------------- our side

/// Records the question and says no.
struct Recorder(Mutex<Option<AskQuestion>>);

impl Confirm for Recorder {
    fn confirm(&self, question: &AskQuestion) -> AskAnswer {
        *self.0.lock().unwrap() = Some(question.clone());
        AskAnswer::Deny
    }
}

fn ours(policy: &Policy, system: &SystemInfo, request: &Value) -> Value {
    let mode = request["mode"].as_str().unwrap();
    let query = Query {
        source: request["source"].as_str().unwrap().to_owned(),
        intended_target: request["target"].as_str().unwrap().to_owned(),
        service_and_arg: request["service"].as_str().unwrap().to_owned(),
        assume_yes_for_ask: mode == "assume_yes",
        just_evaluate: mode == "just_evaluate",
        requested_source: None,
    };
    let recorder = Recorder(Mutex::new(None));
    let decision = policy.evaluate(&query, system, &recorder);
    if let Some(question) = recorder.0.lock().unwrap().take() {
        let mut targets = question.targets.clone();
        targets.sort();
        return json!({"result": "ask", "targets": targets, "default": question.default_target});
    }
    match decision {
        Decision::Allow {
            user,
            target,
            target_uuid,
            autostart,
            requested_target,
        } => {
            let mut reply = json!({
                "user": user.unwrap_or_else(|| "DEFAULT".to_owned()),
                "result": "allow",
                "target": target,
                "autostart": if autostart { "True" } else { "False" },
                "requested_target": requested_target,
            });
            if let Some(u) = target_uuid {
                reply["target_uuid"] = Value::from(u);
            }
            json!({"result": "allow", "reply": reply})
        }
        Decision::AllowJustEvaluate => json!({"result": "allow", "reply": {"result": "allow"}}),
        Decision::Deny { reason, notify } => {
            json!({"result": "deny", "notify": notify, "why": reason})
        }
    }
}

// ---------------------------------------------------------------- setup

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("POLICY_DIFF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = fs::read_dir("/root/.pyenv/versions") {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("3.12"))
            .map(|e| e.path().join("bin/python3.12"))
            .collect();
        found.sort();
        candidates.extend(found);
    }
    candidates.push(PathBuf::from("python3.12"));
    candidates.into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Unpack Qubes' qrexec package; returns the directory holding `qrexec/`.
fn unpack_reference() -> Result<PathBuf, String> {
    let folder = std::env::var_os("QUBES_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/reference"));
    let tarball = folder.join("qubes-core-qrexec.tar.gz");
    if !tarball.is_file() {
        return Err(format!(
            "{} not found (Qubes' reference sources; set QUBES_REFERENCE_DIR to the folder holding it)",
            tarball.display()
        ));
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("policy-differential");
    let marker = out.join("qubes-core-qrexec/qrexec/policy/parser.py");
    // unpacked again whenever the tarball changes
    let stamp_file = out.join("unpacked-from");
    let meta = fs::metadata(&tarball).map_err(|e| format!("{}: {e}", tarball.display()))?;
    let stamp = format!(
        "{} {} {:?}",
        tarball.display(),
        meta.len(),
        meta.modified().ok()
    );
    if !marker.is_file() || fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str())
    {
        let _ = fs::remove_dir_all(out.join("qubes-core-qrexec"));
        fs::create_dir_all(&out).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&out)
            .arg("qubes-core-qrexec/qrexec")
            .status()
            .map_err(|e| format!("cannot run tar: {e}"))?;
        if !status.success() || !marker.is_file() {
            return Err(format!("unpacking {} failed ({status})", tarball.display()));
        }
        fs::write(&stamp_file, &stamp).unwrap();
    }
    Ok(out.join("qubes-core-qrexec"))
}

// ---------------------------------------------------------------- comparison

#[derive(Default)]
struct Tally {
    compared: usize,
    agree: BTreeMap<&'static str, usize>,
    total: BTreeMap<&'static str, usize>,
    skipped: BTreeMap<&'static str, usize>,
    allow_where_qubes_denies: usize,
    ask_where_qubes_denies: usize,
    load_errors_agreed: usize,
    mismatches: Vec<String>,
    reasons: BTreeMap<String, usize>,
}

fn class(answer: &Value) -> &'static str {
    match answer["result"].as_str().unwrap_or("") {
        "allow" => "allow",
        "ask" => "ask",
        "deny" => "deny",
        _ => "error",
    }
}

/// A documented Qubes accident this case shows, if any (see the module
/// docs); the comparison skips it.
fn accident(py: &Value, ours: &Value, uses_adminvm: bool) -> Option<&'static str> {
    if class(py) == "allow"
        && class(ours) == "deny"
        && ours["why"] == "loopback qrexec connection not supported"
    {
        return Some("loopback by uuid");
    }
    if uses_adminvm {
        const NAME: &str = "@adminvm survives an earlier deny in ask choices";
        let ours_why = ours["why"].as_str().unwrap_or("");
        let no_choice = ours_why.ends_with("but no target is available to choose from")
            || ours_why.ends_with("is not a valid choice");
        match (class(py), class(ours)) {
            ("ask", "ask") => {
                let py_targets: Vec<&Value> = py["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| *t != "dom0")
                    .collect();
                let ours_targets: Vec<&Value> =
                    ours["targets"].as_array().unwrap().iter().collect();
                let default_ok = py["default"] == ours["default"]
                    || (py["default"] == "dom0" && ours["default"].is_null());
                if py["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t == "dom0")
                    && !ours_targets.iter().any(|t| *t == "dom0")
                    && py_targets == ours_targets
                    && default_ok
                {
                    return Some(NAME);
                }
            }
            ("ask", "deny") if no_choice && py["targets"] == json!(["dom0"]) => return Some(NAME),
            // assuming yes for something else: Qubes refuses the choice
            // among its (dom0-only) list, we find no list at all
            ("deny", "deny")
                if py["why"]
                    .as_str()
                    .is_some_and(|w| w.ends_with("is not a valid choice"))
                    && ours_why.ends_with("but no target is available to choose from") =>
            {
                return Some(NAME);
            }
            ("allow", "deny") if no_choice && py["reply"]["target"] == "dom0" => {
                return Some(NAME);
            }
            _ => {}
        }
    }
    None
}

fn same(py: &Value, ours: &Value) -> bool {
    match (class(py), class(ours)) {
        ("allow", "allow") => py["reply"] == ours["reply"],
        ("ask", "ask") => py["targets"] == ours["targets"] && py["default"] == ours["default"],
        ("deny", "deny") => {
            // the reason as logged; Qubes prints the line of an implicit
            // legacy deny rule as `None`, we print 0
            let why = py["why"].as_str().unwrap_or("").replace(":None", ":0");
            (py["notify"].is_null() || py["notify"] == ours["notify"])
                && (py["notify"].is_null() || ours["why"].as_str() == Some(why.as_str()))
        }
        // an exception in Qubes refuses the call
        ("error", "deny") => true,
        _ => false,
    }
}

/// `eprintln!` straight to the process's standard error, past the test
/// harness's capture, so that the figures (or why the test could not run)
/// show in every `cargo test` log.
macro_rules! report {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Say why the comparison cannot run; a failure if `POLICY_DIFF_REQUIRED`
/// is set (for CI, where both must be there).
fn skip(why: &str) {
    assert!(
        std::env::var_os("POLICY_DIFF_REQUIRED").is_none(),
        "differential test cannot run (POLICY_DIFF_REQUIRED is set): {why}"
    );
    report!("SKIPPED differential test against Qubes' policy parser: {why}");
}

#[test]
fn agrees_with_qubes_parser() {
    let Some(python) = find_python() else {
        skip(
            "no Python 3.12 found (set POLICY_DIFF_PYTHON, or install pyenv's 3.12 under /root/.pyenv, or python3.12 on PATH)",
        );
        return;
    };
    let package = match unpack_reference() {
        Ok(p) => p,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let requests: usize = std::env::var("POLICY_DIFF_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15_000);
    let seed: u64 = std::env::var("POLICY_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0010);
    report!(
        "differential: {requests} requests, seed {seed}, Python {}, Qubes package {}",
        python.display(),
        package.display()
    );
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let worlds_needed = requests.div_ceil(REQUESTS_PER_WORLD).max(1);
    // batches bound memory and temp-disk use for big runs
    let batch_size = 200;
    let mut done = 0;
    while done < worlds_needed {
        let n = batch_size.min(worlds_needed - done);
        run_batch(&python, &package, &mut rng, n, &mut tally);
        done += n;
    }
    report!(
        "differential: compared {} requests; load errors agreed in {} worlds",
        tally.compared,
        tally.load_errors_agreed
    );
    for (class, total) in &tally.total {
        let agree = tally.agree.get(class).copied().unwrap_or(0);
        report!(
            "  Qubes {class:5}: {agree}/{total} agree ({:.2} %)",
            100.0 * agree as f64 / *total as f64
        );
    }
    for (what, n) in &tally.skipped {
        report!("  skipped (documented Qubes accident, ours safer): {what}: {n}");
    }
    report!(
        "  we allow where Qubes denies: {}; we ask where Qubes denies: {}",
        tally.allow_where_qubes_denies,
        tally.ask_where_qubes_denies
    );
    for (why, n) in &tally.reasons {
        report!("  Qubes {why}…: {n}");
    }
    for m in tally.mismatches.iter().take(15) {
        report!("MISMATCH {m}");
    }
    assert!(tally.compared > 0, "nothing was compared");
    assert_eq!(
        tally.allow_where_qubes_denies, 0,
        "we allow where Qubes denies"
    );
    assert!(
        tally.mismatches.is_empty(),
        "{} requests (or loads) differ from Qubes' parser; first ones above",
        tally.mismatches.len()
    );
}

fn run_batch(python: &Path, package: &Path, rng: &mut Rng, worlds: usize, tally: &mut Tally) {
    let dir = tempfile::tempdir().unwrap();
    let mut batch = Vec::new();
    let mut ours_side = Vec::new();
    for w in 0..worlds {
        let world = random_world(rng);
        let root = dir.path().join(format!("w{w}"));
        let paths = write_policy(&world, rng, &root);
        let requests: Vec<Value> = (0..REQUESTS_PER_WORLD)
            .map(|_| random_request(&world, rng))
            .collect();
        batch.push(json!({
            "policy_dirs": paths.policy_dirs,
            "legacy_dir": paths.legacy_dir,
            "system": world.system_json(),
            "requests": requests,
        }));
        let uses_adminvm = dump_tree(&root).contains("adminvm");
        ours_side.push((world.system(), paths, requests, root, uses_adminvm));
    }
    let mut child = Command::new(python)
        .arg(repo_root().join("dom0-tools/policy/tests/differential/driver.py"))
        .arg(package)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python driver");
    let input = serde_json::to_vec(&batch).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(output.status.success(), "the Python driver failed");
    let results: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(results.len(), ours_side.len());
    for (py, (system, paths, requests, root, uses_adminvm)) in results.iter().zip(&ours_side) {
        let loaded = Policy::load(paths);
        if let Some(py_error) = py.get("load_error") {
            match loaded {
                Err(e) if py_error.as_str() == Some(e.to_string().as_str()) => {
                    tally.load_errors_agreed += 1
                }
                Err(e) => tally.mismatches.push(format!(
                    "load error in {}: Qubes {py_error}, ours {e}",
                    root.display()
                )),
                Ok(_) => tally.mismatches.push(format!(
                    "load in {}: Qubes refuses ({py_error}), ours loads",
                    root.display()
                )),
            }
            continue;
        }
        let policy = match loaded {
            Ok(p) => p,
            Err(e) => {
                tally.mismatches.push(format!(
                    "load in {}: Qubes loads, ours refuses: {e}",
                    root.display()
                ));
                continue;
            }
        };
        for (answer, request) in py["answers"].as_array().unwrap().iter().zip(requests) {
            let mine = ours(&policy, system, request);
            if let Some(what) = accident(answer, &mine, *uses_adminvm) {
                *tally.skipped.entry(what).or_default() += 1;
                continue;
            }
            tally.compared += 1;
            let c = class(answer);
            if std::env::var_os("POLICY_DIFF_VERBOSE").is_some() {
                let why = answer["why"].as_str().unwrap_or("");
                let key: String = why
                    .split_whitespace()
                    .filter(|w| !w.contains('/'))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" ");

                *tally.reasons.entry(format!("{c} {key}")).or_default() += 1;
            }
            *tally.total.entry(c).or_default() += 1;
            if same(answer, &mine) {
                *tally.agree.entry(c).or_default() += 1;
                continue;
            }
            if matches!(c, "deny" | "error") {
                match class(&mine) {
                    "allow" => tally.allow_where_qubes_denies += 1,
                    "ask" => tally.ask_where_qubes_denies += 1,
                    _ => {}
                }
            }
            if tally.mismatches.len() < 200 {
                let files = dump_tree(root);
                tally.mismatches.push(format!(
                    "request {request}\n  Qubes: {answer}\n  ours:  {mine}\n  system: {}\n{files}",
                    json!(system_summary(system))
                ));
            }
        }
    }
}

fn system_summary(system: &SystemInfo) -> Value {
    let mut out = serde_json::Map::new();
    for (name, d) in system.iter() {
        out.insert(
            name.to_owned(),
            json!({"type": d.vm_type, "tags": d.tags, "dvm_tpl": d.template_for_dispvms,
                   "default_dispvm": d.default_dispvm, "power": d.power_state,
                   "uuid": d.uuid, "internal": d.internal}),
        );
    }
    Value::Object(out)
}

fn dump_tree(root: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let text = fs::read_to_string(&p).unwrap_or_default();
                writeln!(out, "  --- {}", p.strip_prefix(root).unwrap().display()).unwrap();
                for line in text.lines() {
                    writeln!(out, "  | {line}").unwrap();
                }
            }
        }
    }
    out
}
