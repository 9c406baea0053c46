"""Summarises a ``tools/gpu_check.sh`` run: reads OUT/steps.tsv (name, exit status, seconds, JUnit XML
path or "-" per step; exit code -1: not run, the time budget was spent), the JUnit XML of each
pytest step and pytest-benchmark's JSON, and writes OUT/gpu_check.json (environment, steps with their
test counts, failures and skip reasons, benchmark figures). Exit status 1 when a step failed or was not
run, else 0. ``gpu_check.sh`` runs it after every step: the environment (versions, GPU) is read at the
first run and kept from the existing gpu_check.json after that.

Usage: python tools/gpu_check_report.py OUT
"""
from __future__ import annotations

import importlib
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# pytest's exit status 5: no test was collected (all deselected), not a failure.
NOTHING_COLLECTED = 5
# gpu_check.sh's exit code of a step it did not start: the time budget was spent.
NOT_RUN = -1


def environment() -> dict:
    """Versions and the GPU, as far as they can be imported."""
    env: dict = {"python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError as error:
        env["torch"] = f"not importable: {error}"
    for name in ("triton", "transformers", "numpy"):
        try:
            env[name] = importlib.import_module(name).__version__
        except ImportError:
            env[name] = None
    try:
        from lens_fast import _C

        env["lens_fast_C_with_cuda"] = bool(_C.with_cuda)
    except ImportError as error:
        env["lens_fast_C_with_cuda"] = f"not importable: {error}"
    return env


def junit_summary(path: Path) -> dict:
    """Counts of passed / failed / error / skipped test cases, the failed test ids and the skip reasons."""
    counts: Counter = Counter()
    failures, skips = [], Counter()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or "").strip().splitlines()
                failures.append(f"{name}: {message[0][:300] if message else child.tag}")
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "").strip()[:200]] += 1
        counts[outcome] += 1
    return {"tests": {k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped")},
            "failures": failures, "skip_reasons": dict(skips)}


def benchmark_figures(path: Path) -> list[dict]:
    """One entry per benchmark: times in seconds, GB/s from ``extra_info["bytes"]``, peak memory."""
    figures = []
    for bench in json.loads(path.read_text())["benchmarks"]:
        stats, extra = bench["stats"], bench.get("extra_info", {})
        entry = {"name": bench["fullname"], "group": bench.get("group"), "median_s": stats["median"],
                 "min_s": stats["min"], "rounds": stats["rounds"]}
        if extra.get("bytes"):
            entry["gb_per_s"] = extra["bytes"] / stats["median"] / 1e9
        for key in ("memcpy_gbps", "peak_mib"):
            if key in extra:
                entry[key] = extra[key]
        figures.append(entry)
    return figures


def summarise(out: Path) -> dict:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, code, seconds, junit = line.split("\t")
        step = {"name": name, "exit_code": int(code), "seconds": int(seconds)}
        step["ok"] = step["exit_code"] in (0, NOTHING_COLLECTED)
        if step["exit_code"] == NOT_RUN:
            step["not_run"] = True
        if junit != "-" and Path(junit).is_file():
            step.update(junit_summary(Path(junit)))
        steps.append(step)
    bench = out / "benchmarks.json"
    previous = out / "gpu_check.json"
    return {
        "ok": bool(steps) and all(s["ok"] for s in steps),
        "environment": json.loads(previous.read_text())["environment"] if previous.is_file() else environment(),
        "steps": steps,
        "benchmarks": benchmark_figures(bench) if bench.is_file() else [],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    report = summarise(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for step in report["steps"]:
        tests = step.get("tests")
        counts = ", ".join(f"{v} {k}" for k, v in tests.items() if v) if tests else ""
        status = "ok  " if step["ok"] else "MISS" if step.get("not_run") else "FAIL"
        print(f"{status} {step['name']} ({step['seconds']}s) {counts}")
        for failure in step.get("failures", []):
            print(f"       {failure}")
    for entry in report["benchmarks"]:
        rate = f", {entry['gb_per_s']:.1f} GB/s" if "gb_per_s" in entry else ""
        print(f"bench {entry['name']}: median {entry['median_s'] * 1e3:.3f} ms{rate}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
