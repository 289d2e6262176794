//! Policy load time and per-decision time at 10, 1 000 and 10 000 rules.
//!
//! Run: `cargo bench -p qrexec-policy --bench policy`. Measurement times
//! are kept short because the build machine is shared.
#![allow(clippy::unwrap_used)] // reason: benchmark code

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use qrexec_policy::{Domain, NoConfirm, Policy, PolicyPaths, Query, SystemInfo};

const QUBES: usize = 50;

fn system() -> SystemInfo {
    let mut domains = vec![("dom0".to_owned(), Domain::new("AdminVM"))];
    for i in 0..QUBES {
        let mut d = Domain::new("AppVM");
        if i % 3 == 0 {
            d.tags.push("t1".into());
        }
        d.default_dispvm = Some("q0".into());
        d.template_for_dispvms = i == 0;
        domains.push((format!("q{i}"), d));
    }
    SystemInfo::new(domains).unwrap()
}

/// `n` rules over `n / 10` services, mixing names, tags, `@anyvm`,
/// `@dispvm`, `@default` and all three actions, ending with a catch-all.
fn policy_text(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n.saturating_sub(1) {
        let service = format!("test.Svc{}", i / 10);
        let argument = if i % 3 == 0 {
            "*".to_owned()
        } else {
            format!("+a{}", i % 5)
        };
        let source = match i % 10 {
            0 => "@anyvm".to_owned(),
            1 => "@tag:t1".to_owned(),
            _ => format!("q{}", i % QUBES),
        };
        let (target, action) = match i % 7 {
            0 => ("@anyvm".to_owned(), "deny".to_owned()),
            1 => ("@dispvm".to_owned(), "allow".to_owned()),
            2 => (
                "@default".to_owned(),
                format!("allow target=q{}", (i + 1) % QUBES),
            ),
            3 => (
                format!("q{}", (i * 7) % QUBES),
                "ask default_target=q1".to_owned(),
            ),
            _ => (
                format!("q{}", (i * 7) % QUBES),
                "allow user=user".to_owned(),
            ),
        };
        out.push_str(&format!(
            "{service} {argument} {source} {target} {action}\n"
        ));
    }
    out.push_str("* * @anyvm @anyvm deny\n");
    out
}

fn write_policy(dir: &Path, n: usize) {
    // split over 10 files, as a real policy.d would be
    let text = policy_text(n);
    let lines: Vec<&str> = text.lines().collect();
    let per_file = lines.len().div_ceil(10).max(1);
    for (i, chunk) in lines.chunks(per_file).enumerate() {
        std::fs::write(
            dir.join(format!("{:02}-bench.policy", 10 + i)),
            chunk.join("\n") + "\n",
        )
        .unwrap();
    }
}

fn query(source: &str, target: &str, service: &str) -> Query {
    Query {
        source: source.into(),
        intended_target: target.into(),
        service_and_arg: service.into(),
        ..Query::default()
    }
}

fn benches(c: &mut Criterion) {
    let system = system();
    let mut load = c.benchmark_group("load");
    load.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [10usize, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(dir.path(), n);
        let paths = PolicyPaths {
            policy_dirs: vec![dir.path().to_owned()],
            legacy_dir: dir.path().to_owned(),
        };
        assert_eq!(Policy::load(&paths).unwrap().rules().len(), n);
        load.bench_with_input(BenchmarkId::from_parameter(n), &paths, |b, paths| {
            b.iter(|| Policy::load(black_box(paths)).unwrap())
        });
        drop(load_keep(dir));
    }
    load.finish();

    let mut decide = c.benchmark_group("decision");
    decide
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [10usize, 1_000, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        write_policy(dir.path(), n);
        let paths = PolicyPaths {
            policy_dirs: vec![dir.path().to_owned()],
            legacy_dir: dir.path().to_owned(),
        };
        let policy = Policy::load(&paths).unwrap();
        // a rule in the middle of the policy, and a request that only the
        // final catch-all matches (the worst case for a linear scan)
        let mid = (n / 2..n)
            .find(|i| i % 7 >= 4 && i % 10 >= 2 && i % 3 != 0)
            .unwrap_or(0);
        let hit = query(
            &format!("q{}", mid % QUBES),
            &format!("q{}", (mid * 7) % QUBES),
            &format!("test.Svc{}+a{}", mid / 10, mid % 5),
        );
        assert!(policy.evaluate(&hit, &system, &NoConfirm).is_allow() || n < 20);
        let ask_at = (n / 2..n).find(|i| i % 7 == 3 && i % 10 >= 2 && i % 3 != 0);
        let ask = ask_at.map(|i| {
            let mut q = query(
                &format!("q{}", i % QUBES),
                &format!("q{}", (i * 7) % QUBES),
                &format!("test.Svc{}+a{}", i / 10, i % 5),
            );
            q.assume_yes_for_ask = true;
            q
        });
        let miss = query("q3", "q4", "test.Unknown+x");
        decide.bench_with_input(BenchmarkId::new("indexed-hit", n), &hit, |b, q| {
            b.iter(|| policy.evaluate(black_box(q), &system, &NoConfirm))
        });
        decide.bench_with_input(BenchmarkId::new("indexed-catch-all", n), &miss, |b, q| {
            b.iter(|| policy.evaluate(black_box(q), &system, &NoConfirm))
        });
        if let Some(ask) = &ask {
            decide.bench_with_input(
                BenchmarkId::new("indexed-ask-assume-yes", n),
                ask,
                |b, q| b.iter(|| policy.evaluate(black_box(q), &system, &NoConfirm)),
            );
        }
        decide.bench_with_input(BenchmarkId::new("linear-catch-all", n), &miss, |b, q| {
            b.iter(|| policy.evaluate_linear(black_box(q), &system, &NoConfirm))
        });
    }
    decide.finish();
}

fn load_keep(dir: tempfile::TempDir) -> tempfile::TempDir {
    dir
}

criterion_group!(policy_benches, benches);
criterion_main!(policy_benches);
