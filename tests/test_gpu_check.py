"""tools/gpu_check.sh (its syntax; it runs for real only on a GPU) and its report writer
tools/gpu_check_report.py on the files a run leaves: steps.tsv, pytest's JUnit XML, pytest-benchmark's JSON."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="4"><testcase classname="tests.test_reward_iou" name="test_a[uint8]" time="0.1"/>
<testcase classname="tests.test_reward_iou" name="test_b" time="0.2"><failure message="AssertionError: launches [3] differ&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_reward_iou" name="test_c" time="0"><skipped type="pytest.skip" message="needs a CUDA GPU">x</skipped></testcase>
<testcase classname="tests.test_reward_iou" name="test_d" time="0"><skipped type="pytest.skip" message="needs a CUDA GPU">x</skipped></testcase>
</testsuite></testsuites>"""

BENCH = {"benchmarks": [
    {"fullname": "bench/test_mask_stats.py::test_mask_stats_cuda[a]", "group": "mask_stats cuda",
     "stats": {"median": 0.002, "min": 0.0015, "rounds": 5}, "extra_info": {"bytes": 8_000_000, "memcpy_gbps": 1500.0}},
    {"fullname": "bench/test_nn_fuse_mask_decoder.py::test_decoder_cuda[b]", "group": "decoder",
     "stats": {"median": 0.01, "min": 0.009, "rounds": 3}, "extra_info": {"peak_mib": 12.5}},
]}


@pytest.fixture
def report():
    spec = importlib.util.spec_from_file_location("gpu_check_report", TOOLS / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(TOOLS / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_report_of_a_failed_run(report, tmp_path, capsys):
    (tmp_path / "junit-reward_iou.xml").write_text(JUNIT)
    (tmp_path / "benchmarks.json").write_text(json.dumps(BENCH))
    (tmp_path / "steps.tsv").write_text(
        "build\t0\t61\t-\n"
        f"reward_iou last arrival vs C++\t1\t12\t{tmp_path / 'junit-reward_iou.xml'}\n"
        f"other CUDA tests\t5\t3\t{tmp_path / 'junit-other.xml'}\n"  # nothing collected, no XML
        "GPU benchmarks\t-1\t0\t-\n"  # the time budget was spent
    )
    assert report.main(["gpu_check_report.py", str(tmp_path)]) == 1
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["ok"] is False
    build, reward_iou, other, benchmarks = out["steps"]
    assert build == {"name": "build", "exit_code": 0, "seconds": 61, "ok": True}
    assert reward_iou["ok"] is False and reward_iou["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 2}
    assert reward_iou["failures"] == ["tests.test_reward_iou::test_b: AssertionError: launches [3] differ"]
    assert reward_iou["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert other == {"name": "other CUDA tests", "exit_code": 5, "seconds": 3, "ok": True}
    assert benchmarks == {"name": "GPU benchmarks", "exit_code": -1, "seconds": 0, "ok": False, "not_run": True}
    first, second = out["benchmarks"]
    assert first["gb_per_s"] == pytest.approx(4.0) and first["memcpy_gbps"] == 1500.0 and first["rounds"] == 5
    assert "gb_per_s" not in second and second["peak_mib"] == 12.5 and second["median_s"] == 0.01
    assert set(out["environment"]) >= {"python", "torch", "triton", "transformers", "numpy", "lens_fast_C_with_cuda"}
    printed = capsys.readouterr().out
    assert "FAIL reward_iou last arrival vs C++ (12s) 1 passed, 1 failed, 2 skipped" in printed
    assert "bench bench/test_mask_stats.py::test_mask_stats_cuda[a]: median 2.000 ms, 4.0 GB/s" in printed
    assert "MISS GPU benchmarks (0s)" in printed


def test_report_keeps_the_environment_of_the_first_run(report, tmp_path):
    """gpu_check.sh rewrites the report after every step; the versions are read once."""
    (tmp_path / "steps.tsv").write_text("build\t0\t61\t-\n")
    (tmp_path / "gpu_check.json").write_text(json.dumps({"environment": {"torch": "2.11.0", "gpu": "NVIDIA H200"}}))
    assert report.main(["gpu_check_report.py", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["environment"] == {"torch": "2.11.0", "gpu": "NVIDIA H200"} and out["steps"][0]["ok"] is True


def test_script_stops_at_its_budget_and_leaves_few_files(tmp_path):
    """With a budget too short for any step, every step is recorded as not run, the JSON is written,
    the exit status is 1, and OUT holds no more files than a device run returns (8)."""
    import sys

    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "LENS_FAST_WHEELS": str(wheels), "GPU_CHECK_BUDGET_S": "10"}
    result = subprocess.run(["bash", str(TOOLS / "gpu_check.sh"), str(out), "--no-build"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is False and report["steps"]
    assert all(step.get("not_run") for step in report["steps"]), report["steps"]
    assert {step["name"] for step in report["steps"]} >= {"reward_iou last arrival vs C++", "GPU benchmarks"}
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "steps.tsv"]
    assert "not run" in (out / "gpu_check.log").read_text()


def test_report_of_a_clean_run_without_benchmarks(report, tmp_path):
    (tmp_path / "steps.tsv").write_text("build\t0\t61\t-\n")
    assert report.main(["gpu_check_report.py", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["ok"] is True and out["benchmarks"] == []
    assert report.main(["gpu_check_report.py"]) == 2  # usage
