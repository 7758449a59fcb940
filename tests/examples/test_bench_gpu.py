"""examples/bench_gpu.py end to end on CPU (``--dry-run``), and its planning and comparison rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
import bench_gpu  # noqa: E402  (an example script, imported from its directory)


def test_dry_run_writes_a_measured_table_and_the_equivalence(tmp_path):
    """The GPU run's whole path on CPU: equivalence child, a training child with its profile
    window, the plan's memory, JSON and Markdown written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "bench_gpu.py"), "--out", str(tmp_path), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    (cell,) = doc["cells"]
    assert cell["status"] == "measured", cell
    assert cell["grad_accumulation"] == 2 and len(cell["step_times_s"]) == 2
    # tokens/s is the global batch's tokens over the median timed step
    assert cell["tokens_per_s_per_gpu"] == pytest.approx(4 * 64 / cell["step_time_s"])
    assert cell["mfu"] is None  # no peak on CPU
    assert cell["plan_mem_gib"] > 0 and cell["peak_mem_gib"] > 0
    prof = cell["profile"]
    assert prof["status"] == "measured" and prof["source"] == "cpu_ops"
    assert sum(prof["window_shares"].values()) == pytest.approx(1.0)
    assert doc["equivalence"]["checks"]["on"]["ok"] is True
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "| mbs2-none-on | on | 2 | none | 2 |" in md and "measured" in md
    assert not list(tmp_path.glob("*.tmp"))


def _bench(tmp_path, **kw):
    args = bench_gpu.parse_args(["--out", str(tmp_path), *kw.pop("argv", [])])
    bench = bench_gpu.Bench(args)
    for key, value in kw.items():
        setattr(bench, key, value)
    return bench


def test_cells_that_do_not_fit_or_failed_equivalence_are_skipped_with_the_reason(tmp_path):
    bench = _bench(tmp_path, argv=["--matrix", "1:none:off,1:none:on,3:none:on"])
    bench.device = {"name": "NVIDIA H100 80GB HBM3", "total_memory_gib": 79.1}
    bench.failed_sets = {"on": "loss differs"}
    off, on, odd = bench.cells
    bench.run_cell(on)
    assert on.status == "refused" and "equivalence" in on.why
    bench.failed_sets = {}
    bench.run_cell(odd)
    assert odd.status == "skipped" and "not a multiple of 3" in odd.why
    bench.device["total_memory_gib"] = 40.0  # the 3B model's plan (~75 GiB at mbs 1) cannot fit
    bench.run_cell(off)
    assert off.status == "skipped" and "plan predicts" in off.why and off.plan_mem_gib > 40
    bench.device["total_memory_gib"] = 1000.0
    bench.deadline = bench.start + 5  # too little budget for a first cell (guess: 60 s + 3 x 30 s)
    bench.run_cell(off)
    assert off.status == "skipped" and "budget" in off.why
    bench.write()
    md = (tmp_path / "bench_gpu.md").read_text()
    assert md.count("skipped") == 2 and "refused" in md


def test_estimates_follow_measured_cells_and_compare_flags_differences():
    bench = bench_gpu.Bench.__new__(bench_gpu.Bench)
    bench.args = bench_gpu.parse_args(["--out", "/tmp/unused-bench", "--matrix", "1:none:on,2:full:on"])
    bench.cells = bench_gpu.parse_matrix(bench.args.matrix)
    bench.startup_s = 40.0
    measured, full = bench.cells
    measured.step_time_s = 10.0
    assert bench.estimate_s(full, 3) == pytest.approx(40 + 3 * 10 * 1.34)
    same = bench_gpu.compare([[2.0, 1.0]] * 5, [[2.0, 1.0004]] * 5, {"loss": 1e-5, "grad_norm": 5e-4})
    assert same["ok"] and same["max_rel_diff"]["grad_norm"] == pytest.approx(4e-4)
    apart = bench_gpu.compare([[2.0, 1.0]] * 5, [[2.0, 1.01]] * 5, {"loss": 1e-5, "grad_norm": 5e-4})
    assert not apart["ok"]
    assert not bench_gpu.compare([[2.0, 1.0]], [[float("nan"), 1.0]], {"loss": 1, "grad_norm": 1})["ok"]
    with pytest.raises(SystemExit, match="switch set"):
        bench_gpu.parse_matrix("1:none:turbo")


@pytest.mark.parametrize("reduced_ok", [True, False])
def test_a_failing_on_set_is_bisected_and_measured_without_the_failing_switch(tmp_path, monkeypatch, reduced_ok):
    """The GPU check's decision logic, with the children's verdicts stood in for: cuDNN
    attention fails alone, everything else passes; "on" is then measured without it when
    that reduced set passes, and refused when it does not."""
    bench = _bench(tmp_path, argv=["--matrix", "1:none:off,1:none:on"])
    runs = []

    def fake_run(cfg_path, variants, overrides, tag):
        runs.append(tag)
        bench.equivalence["off"] = {"steps": [[1.0, 1.0]] * 5}
        checks = bench.equivalence.setdefault("checks", {})
        for name, extra in variants.items():
            if name in ("off", "off_repeat"):
                continue
            bad = "performance.sdpa_backend=auto" in extra or name == "on"
            if name == "on_reduced":
                bad = not reduced_ok
            checks[name] = {"ok": not bad}

    monkeypatch.setattr(bench, "run_equivalence", fake_run)
    bench.check_equivalence()
    assert runs == ["equivalence", "bisect", "reduced"]
    if reduced_ok:
        assert bench.switch_sets["on"] == ["performance.sdpa_backend=default"] and not bench.failed_sets
        assert bench.equivalence["on_measured_without"] == ["sdpa_backend_auto"]
    else:
        assert "on" in bench.failed_sets and bench.switch_sets["on"] == []
