//! Property test: the compiled index gives exactly the first-match result
//! of a straightforward linear scan, on thousands of random policies,
//! random qube sets and random requests (deterministic seeds, so a failure
//! is reproducible; the failing seed and policy are printed).
#![allow(clippy::unwrap_used)] // reason: test code

use qrexec_policy::loader::load_text;
use qrexec_policy::{Decision, Domain, NoConfirm, Policy, Query, SystemInfo};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const QUBES: [&str; 6] = ["work", "personal", "vault", "dvm", "dvm2", "tpl"];
const TAGS: [&str; 3] = ["t1", "t2", "t3"];

fn random_system(rng: &mut Rng) -> SystemInfo {
    let mut domains = vec![("dom0".to_owned(), Domain::new("AdminVM"))];
    for (i, name) in QUBES.iter().enumerate() {
        let mut d = Domain::new(if *name == "tpl" {
            "TemplateVM"
        } else {
            "AppVM"
        });
        d.tags = TAGS
            .iter()
            .filter(|_| rng.chance(40))
            .map(|t| (*t).to_owned())
            .collect();
        d.template_for_dispvms = rng.chance(40);
        d.default_dispvm = match rng.below(4) {
            0 => None,
            1 => Some("dvm".into()),
            2 => Some("dvm2".into()),
            _ => Some("work".into()),
        };
        d.power_state = if rng.chance(70) { "Running" } else { "Halted" }.into();
        d.uuid = Some(format!("u-{i}"));
        domains.push(((*name).to_owned(), d));
    }
    SystemInfo::new(domains).unwrap()
}

const SOURCES: [&str; 15] = [
    "work",
    "personal",
    "vault",
    "dvm",
    "ghost",
    "dom0",
    "@adminvm",
    "@anyvm",
    "*",
    "@tag:t1",
    "@tag:t2",
    "@type:AppVM",
    "@type:AdminVM",
    "@dispvm:dvm",
    "uuid:u-0",
];
const TARGETS: [&str; 20] = [
    "work",
    "personal",
    "vault",
    "dvm",
    "ghost",
    "dom0",
    "@adminvm",
    "@anyvm",
    "*",
    "@tag:t1",
    "@tag:t3",
    "@type:TemplateVM",
    "@default",
    "@dispvm",
    "@dispvm:dvm",
    "@dispvm:dvm2",
    "@dispvm:@tag:t1",
    "@dispvm:@tag:t2",
    "uuid:u-1",
    "uuid:u-9",
];
const REDIRECTS: [&str; 7] = [
    "work",
    "vault",
    "dom0",
    "@dispvm",
    "@dispvm:dvm",
    "ghost",
    "uuid:u-2",
];

fn random_rule(rng: &mut Rng) -> String {
    let service = rng.pick(&["a", "a", "b", "c", "*"]);
    let argument = if service == "*" {
        "*"
    } else {
        rng.pick(&["*", "*", "+", "+x", "+y"])
    };
    let source = rng.pick(&SOURCES);
    let target = rng.pick(&TARGETS);
    let mut line = format!("{service} {argument} {source} {target} ");
    match rng.below(3) {
        0 => {
            line.push_str("deny");
            if rng.chance(20) {
                line.push_str(" notify=no");
            }
        }
        1 => {
            line.push_str("allow");
            if target == "@default" || rng.chance(30) {
                line.push_str(&format!(" target={}", rng.pick(&REDIRECTS)));
            }
            if rng.chance(20) {
                line.push_str(" user=u");
            }
            if rng.chance(20) {
                line.push_str(" autostart=no");
            }
        }
        _ => {
            line.push_str("ask");
            if rng.chance(30) {
                line.push_str(&format!(" target={}", rng.pick(&REDIRECTS)));
            }
            if rng.chance(30) {
                line.push_str(&format!(" default_target={}", rng.pick(&REDIRECTS)));
            }
        }
    }
    line
}

fn random_query(rng: &mut Rng) -> Query {
    let service = rng.pick(&["a", "b", "c", "d"]);
    let argument = rng.pick(&["", "+", "+x", "+y", "+z"]);
    Query {
        source: rng
            .pick(&["work", "personal", "vault", "dvm", "tpl", "dom0", "ghost"])
            .into(),
        intended_target: rng
            .pick(&[
                "",
                "work",
                "personal",
                "vault",
                "dvm",
                "dom0",
                "@adminvm",
                "@default",
                "@dispvm",
                "@dispvm:dvm",
                "@dispvm:dvm2",
                "ghost",
                "uuid:u-1",
                "tpl",
            ])
            .into(),
        service_and_arg: format!("{service}{argument}"),
        assume_yes_for_ask: rng.chance(50),
        just_evaluate: rng.chance(20),
        requested_source: None,
    }
}

#[test]
fn index_equals_linear_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0usize;
    let mut matched = 0usize;
    let mut allowed = 0usize;
    for seed in 1..=1500u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let system = random_system(&mut rng);
        let count = 1 + rng.below(60);
        let text: String = (0..count).map(|_| random_rule(&mut rng) + "\n").collect();
        let loaded = load_text(&text, "/p.policy", dir.path(), dir.path()).unwrap_or_else(|e| {
            panic!("seed {seed}: generated policy does not parse: {e}\n{text}")
        });
        let policy = Policy::from_loaded(loaded);
        for _ in 0..40 {
            let query = random_query(&mut rng);
            let indexed = policy.find_rule(
                &query.service_and_arg,
                &query.source,
                &query.intended_target,
                &system,
                true,
            );
            let linear = policy.find_rule(
                &query.service_and_arg,
                &query.source,
                &query.intended_target,
                &system,
                false,
            );
            assert_eq!(indexed, linear, "seed {seed}, {query:?}\n{text}");
            let a = policy.evaluate(&query, &system, &NoConfirm);
            let b = policy.evaluate_linear(&query, &system, &NoConfirm);
            assert_eq!(a, b, "seed {seed}, {query:?}\n{text}");
            checked += 1;
            matched += usize::from(indexed.is_some());
            allowed += usize::from(!matches!(a, Decision::Deny { .. }));
        }
    }
    // the generator must exercise both outcomes, or the test proves nothing
    assert_eq!(checked, 60_000);
    assert!(
        matched > checked / 10,
        "only {matched} of {checked} requests matched a rule"
    );
    assert!(
        allowed > checked / 50,
        "only {allowed} of {checked} requests were allowed"
    );
}
