#!/usr/bin/env python3
"""Counts test cases across meson test runs for .ci/run.

usage: count_tests.py <build-dir or testlog.json>...

Each meson test is a Boost.Test executable run with --report_level=short, whose
report reads

    Test module "test_tensor" has passed with:
      12 test cases out of 12 passed
    Test module "test_linalg" has failed with:
      3 test cases out of 5 passed
      1 test case out of 5 failed
      1 test case out of 5 aborted

Boost already counts aborted cases among the failed ones; skipped ones did
not run. A test without such a report (a script, the consumer test, an
example) counts as one case. A test that failed but reported no failed case (a
crash, a sanitizer report at exit, a timeout) counts one failure more. Given a
build dir, every test meson configured (meson-info/intro-tests.json) that has
no result in meson-logs/testlog.json (it did not build) counts as one failure,
and so does a missing log.

Prints the end of each failing test's output, one line per test, and, as the
last line, "N passed, N failed".
"""
import json
import os
import re
import sys

MODULE = re.compile(r'^Test module "[^"]*" has \w+ with:', re.M)
CASES = re.compile(r"^\s+(\d+) test cases? out of \d+ (passed|failed|aborted|skipped)\s*$")
GOOD = {"OK", "EXPECTEDFAIL"}
TAIL_LINES = 30


def boost_report(output):
    """(passed, failed) from the last short report in output, or None."""
    matches = list(MODULE.finditer(output))
    if not matches:
        return None
    passed = failed = aborted = 0
    for line in output[matches[-1].end():].splitlines()[1:]:
        m = CASES.match(line)
        if not m:
            if line.startswith("  "):
                continue  # assertion counts and the like
            break
        n, what = int(m.group(1)), m.group(2)
        if what == "passed":
            passed += n
        elif what == "failed":
            failed += n
        elif what == "aborted":
            aborted += n
    return passed, max(failed, aborted)


def short_name(name):
    """'hesse:examples / autograd_tour' -> 'autograd_tour'"""
    return name.split(" / ", 1)[-1]


def count_log(path, rows, failures):
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            t = json.loads(line)
            name, result = t.get("name", "?"), t.get("result", "ERROR")
            if result == "SKIP":
                rows.append((name, result, 0, 0))
                continue
            output = (t.get("stdout") or "") + "\n" + (t.get("stderr") or "")
            report = boost_report(output)
            if report is None:
                p, q = (1, 0) if result in GOOD else (0, 1)
            else:
                p, q = report
                if result not in GOOD and q == 0:
                    q = 1  # died after (or without) reporting a failed case
            rows.append((name, result, p, q))
            if q:
                failures.append((name, output.strip().splitlines()[-TAIL_LINES:]))


def count(arg):
    """Rows (name, result, passed, failed) and failure tails for one run."""
    rows, failures = [], []
    build_dir = arg if os.path.isdir(arg) else None
    log = os.path.join(arg, "meson-logs", "testlog.json") if build_dir else arg
    try:
        count_log(log, rows, failures)
    except (OSError, ValueError) as e:
        print(f"{log}: no usable test log ({e})")
    if not rows and not build_dir:
        rows.append((log, "MISSING", 0, 1))
    if build_dir:
        ran = {short_name(r[0]) for r in rows}
        try:
            with open(os.path.join(build_dir, "meson-info", "intro-tests.json"), encoding="utf-8") as f:
                configured = [t["name"] for t in json.load(f)]
        except (OSError, ValueError):
            configured = []
        for name in configured:
            if name not in ran:
                rows.append((name, "NOT RUN", 0, 1))
                failures.append((name, ["did not run (did it build?)"]))
        if not rows:
            rows.append((log, "MISSING", 0, 1))  # not even configured
    return rows, failures


def main(args):
    passed = failed = 0
    for arg in args:
        rows, failures = count(arg)
        for name, tail in failures:
            print(f"---- {arg}: {name} failed; last lines of its output:")
            for line in tail:
                print(f"    {line}")
        for name, result, p, q in rows:
            print(f"  {name:<40} {result:<8} {p:4d} passed {q:4d} failed")
        p, q = sum(r[2] for r in rows), sum(r[3] for r in rows)
        print(f"{arg}: {p} passed, {q} failed")
        passed += p
        failed += q
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
