"""Per-file and per-class pass/fail counts from the suite's JUnit XML.

Usage: summary.py RESULTS.xml LABEL
Prints one line per test file and class, then every test that did not
pass (hangs are the tests pytest-timeout stopped).
"""

import collections
import sys
import xml.etree.ElementTree as ET


def outcome(case):
    for child in case:
        if child.tag in ("failure", "error"):
            msg = child.get("message", "") or ""
            return "hang" if "Timeout" in msg else "fail"
        if child.tag == "skipped":
            return "skip"
    return "pass"


def main():
    path, label = sys.argv[1], sys.argv[2]
    root = ET.parse(path).getroot()
    kinds = ("pass", "fail", "hang", "skip")
    by_file = collections.defaultdict(collections.Counter)
    by_class = collections.defaultdict(collections.Counter)
    total = collections.Counter()
    bad = []
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        parts = cls.split(".")
        file = ".".join(parts[:-1]) or cls
        res = outcome(case)
        by_file[file][res] += 1
        by_class[cls][res] += 1
        total[res] += 1
        if res in ("fail", "hang"):
            bad.append(f"  {res}: {cls}::{case.get('name')}")

    def fmt(c):
        return " ".join(f"{c[k]:3d} {k}" for k in kinds)

    print(f"== Qubes' socket suite against {label} ==")
    for f in sorted(by_file):
        print(f"{f:45s} {fmt(by_file[f])}")
    print("-- per class --")
    for c in sorted(by_class):
        print(f"{c:45s} {fmt(by_class[c])}")
    print(f"{'TOTAL':45s} {fmt(total)}")
    if bad:
        print("-- not passing --")
        print("\n".join(bad))


if __name__ == "__main__":
    main()
