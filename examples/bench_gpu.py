"""One-GPU throughput matrix of the torch-native path: tokens/s, MFU, memory, profile shares.

    python examples/bench_gpu.py --out runs/bench_gpu                    # the GPU run (< 8 min)
    python examples/bench_gpu.py --out /tmp/bench --dry-run              # CPU plumbing check

What it does, in a fixed time budget (``--budget-s``, default 450 s):

1. **Equivalence first.** One subprocess trains a 2-layer cut of the model for 5 steps
   with every ``performance`` switch off, again off (run-to-run noise), and with the
   switch sets the matrix uses (``on``: the config defaults; ``compile``: plus
   ``performance.compile_layers``; ``liger`` when liger-kernel is installed), and compares
   loss and gradient norm per step (bf16 on the GPU: relative 5e-3 on the loss, 5e-2 on the
   gradient norm, or three times the off-vs-off noise when larger; fp32 on CPU: 2e-5 and
   2e-4). A switch set that fails is bisected into its single switches, and no cell of it
   is measured: its figures are refused, not reported.
2. **Cells.** Each cell of the matrix (micro-batch size x recompute x switch set, at
   ``--seq`` and ``--global-batch`` sequences per step through gradient accumulation) is a
   fresh ``python -m engine train`` on mock data: ``--warmup`` steps, then ``--timed``
   steps whose median step time gives tokens/s per GPU and MFU (``engine.metrics.mfu``,
   FLOPs from ``ModelConfig.flops_per_token``); peak memory (CUDA max allocated) is put
   beside the plan's prediction (``parallel.plan.make_plan``). A cell the plan says does
   not fit in the GPU's memory, or that would not finish inside the budget (estimated from
   the cells measured so far), is skipped, and the table says why.
3. **Profile.** For the first cell of each switch set a torch.profiler window records one
   step of ``--profile-micro`` micro-batches (a full step of the global batch would be a
   trace of millions of events); ``examples/kernel_breakdown.py`` classifies its kernels
   into GEMM, attention, optimizer, communication and other. Shares of the global-batch
   step are then computed with every class but the optimizer (once per step) scaled by
   (micro-batches per step) / ``--profile-micro``; both are written.

Writes ``bench_gpu.json`` (every figure, command and reason) and ``bench_gpu.md`` (the
table) into ``--out`` after every cell, each replaced atomically. The parent process never
touches CUDA: everything that does runs in a child that exits before the next starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OFF = [
    "performance.bias_activation_fusion=false",
    "performance.bias_dropout_fusion=false",
    "performance.cross_entropy_fusion=false",
    "performance.sdpa_backend=default",
    "performance.adam=foreach",  # what megatron-core's torch AdamW does on CUDA by default
    "performance.rmsnorm=torch",
    "performance.compile_layers=false",
]
SWITCH_SETS: Dict[str, List[str]] = {
    "off": OFF,
    "on": [],  # the config defaults
    "compile": ["performance.compile_layers=true"],
    "liger": ["performance.rmsnorm=liger"],
}
# Each switch of "on" alone (the bisection of a failed set), and how to leave it out of "on".
SINGLES: Dict[str, List[str]] = {
    "bias_activation_fusion": OFF + ["performance.bias_activation_fusion=true"],
    "bias_dropout_fusion": OFF + ["performance.bias_dropout_fusion=true"],
    "cross_entropy_fusion": OFF + ["performance.cross_entropy_fusion=true"],
    "sdpa_backend_auto": OFF + ["performance.sdpa_backend=auto"],
    "adam_fused": OFF + ["performance.adam=fused"],
}
DISABLE: Dict[str, str] = {
    "bias_activation_fusion": "performance.bias_activation_fusion=false",
    "bias_dropout_fusion": "performance.bias_dropout_fusion=false",
    "cross_entropy_fusion": "performance.cross_entropy_fusion=false",
    "sdpa_backend_auto": "performance.sdpa_backend=default",
    "adam_fused": "performance.adam=foreach",
}
GPU_TOL = {"loss": 5e-3, "grad_norm": 5e-2}
CPU_TOL = {"loss": 2e-5, "grad_norm": 2e-4}
# The plan under-predicted the measured H100 run (57.8 against 61.13 GiB, README "Planning a layout"):
# a cell is skipped when its plan grown by this factor exceeds the GPU's memory.
PLAN_MARGIN = 1.06
# Step time relative to recompute "none" (full recompute repeats the forward: ~4/3).
RECOMPUTE_COST = {"none": 1.0, "selective": 1.05, "full": 1.34}


# ------------------------------------------------------------------------- child: variants

VARIANTS_DOC = """Child mode: train each variant (a list of overrides on CONFIG) for its steps in this
process and write per-step loss and gradient norm, the switches that took effect and the device."""


def run_variants(cfg_path: str, variants: Dict[str, List[str]], out: str) -> None:
    """Train every variant in this process (``Trainer`` rebuilt each time, same seed) and write
    ``{name: {steps: [[loss, grad_norm]...], flags: {...}}, "_device": {...}}`` to ``out``."""
    import torch

    from engine import process_guard
    from engine.callbacks import Callback
    from engine.run_config import load_run_config
    from engine.trainer import Trainer

    class Record(Callback):
        def __init__(self):
            self.steps: List[List[float]] = []
            self.flags: Dict[str, object] = {}

        def on_train_start(self, trainer):
            c = trainer.tf_config
            groups = [
                g
                for o in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
                for g in o.optimizer.param_groups
            ]
            layers = [layer for m in trainer.model for layer in m.module.decoder.layers]
            self.flags = {
                "bias_activation_fusion": c.bias_activation_fusion,
                "bias_dropout_fusion": c.bias_dropout_fusion,
                "cross_entropy_loss_fusion": c.cross_entropy_loss_fusion,
                "adam_fused": all(g.get("fused") for g in groups),
                "adam_foreach": all(g.get("foreach") for g in groups),
                "compiled_layers": sum(getattr(l, "_compiled_call_impl", None) is not None for l in layers),
                "sdpa_backends": getattr(layers[0].self_attention.core_attention, "sdpa_backends", None),
                "norm": type(layers[0].input_layernorm).__name__,
            }

        def on_step_end(self, trainer, step, metrics):
            self.steps.append([metrics["loss"], metrics["grad_norm"]])

    results: Dict[str, object] = {}
    for name, overrides in variants.items():
        rec = Record()
        try:
            with process_guard.in_process_write_results():
                Trainer(load_run_config(cfg_path, overrides), callbacks=[rec]).fit()
            results[name] = {"steps": rec.steps, "flags": rec.flags}
        except Exception as exc:  # one variant's failure is a result, not the end of the check
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        gc.collect()  # the finished Trainer's model and optimizer state, before the next is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device: Dict[str, object] = {"name": "cpu", "total_memory_gib": None, "capability": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {
            "name": props.name,
            "total_memory_gib": props.total_memory / 2**30,
            "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__,
        }
    results["_device"] = device
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, out)


def compare(base: List[List[float]], other: List[List[float]], tol: Dict[str, float]) -> Dict[str, object]:
    """Largest relative differences of loss and gradient norm over the steps, and whether they
    are within ``tol``."""
    if len(base) != len(other) or not base:
        return {"ok": False, "why": f"{len(other)} steps against {len(base)}"}
    diffs = {"loss": 0.0, "grad_norm": 0.0}
    for (l0, g0), (l1, g1) in zip(base, other):
        for key, a, b in (("loss", l0, l1), ("grad_norm", g0, g1)):
            if not (math.isfinite(a) and math.isfinite(b)):
                return {"ok": False, "why": f"non-finite {key}: {b} against {a}"}
            diffs[key] = max(diffs[key], abs(a - b) / max(abs(a), 1e-12))
    ok = all(diffs[k] <= tol[k] for k in diffs)
    return {"ok": ok, "max_rel_diff": diffs, "tolerance": tol}


# --------------------------------------------------------------------------------- parent


@dataclass
class Cell:
    """One point of the matrix and what became of it."""

    micro_batch: int
    recompute: str
    switches: str
    status: str = "planned"
    why: str = ""
    command: List[str] = field(default_factory=list)
    wall_s: Optional[float] = None
    step_times_s: List[float] = field(default_factory=list)
    step_time_s: Optional[float] = None
    tokens_per_s_per_gpu: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_gib: Optional[float] = None
    plan_mem_gib: Optional[float] = None
    grad_accumulation: Optional[int] = None
    profile: Optional[Dict[str, object]] = None
    loss_last: Optional[float] = None

    @property
    def name(self) -> str:
        """``mbs2-selective-on``."""
        return f"mbs{self.micro_batch}-{self.recompute}-{self.switches}"


def parse_matrix(text: str) -> List[Cell]:
    """``"1:none:off,1:none:on"`` -> cells (micro-batch : recompute : switch set), in priority order."""
    cells = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise SystemExit(f"--matrix entry {item!r} is not MICRO_BATCH:RECOMPUTE:SWITCHES")
        mbs, recompute, switches = parts
        if not mbs.isdigit() or int(mbs) < 1:
            raise SystemExit(f"--matrix entry {item!r}: micro-batch must be a positive integer")
        if recompute not in RECOMPUTE_COST:
            raise SystemExit(f"--matrix entry {item!r}: recompute must be one of {', '.join(RECOMPUTE_COST)}")
        if switches not in SWITCH_SETS:
            raise SystemExit(f"--matrix entry {item!r}: switch set must be one of {', '.join(SWITCH_SETS)}")
        cells.append(Cell(int(mbs), recompute, switches))
    return cells


# Priority order: before/after at micro-batch 1, then larger micro-batches and recompute modes.
# ``compile`` and ``liger`` cells are left to --matrix (their equivalence check costs a compile).
DEFAULT_MATRIX = "1:none:off,1:none:on,2:none:on,4:selective:on,2:selective:on,4:full:on,8:full:on"


class Bench:
    """The run: settings, budget, results, and the files they are written to."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.cells = parse_matrix(args.matrix)
        self.equivalence: Dict[str, object] = {}
        self.device: Dict[str, object] = {}
        self.failed_sets: Dict[str, str] = {}
        # Overrides of each switch set as measured ("on" loses switches that fail the check).
        self.switch_sets: Dict[str, List[str]] = {k: list(v) for k, v in SWITCH_SETS.items()}
        self.startup_s: Optional[float] = None
        self.profile_s: Optional[float] = None
        self.log_lines: List[str] = []

    # ------------------------------------------------------------------ helpers
    def left(self) -> float:
        """Seconds of budget left."""
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        """A timestamped progress line (stdout, flushed: the run is read live or from a log)."""
        line = f"[bench_gpu {time.monotonic() - self.start:6.0f}s] {msg}"
        self.log_lines.append(line)
        print(line, flush=True)

    def base_overrides(self, micro_batch: int, global_batch: int, steps: int, recompute: str) -> List[str]:
        """Overrides every training child gets (preset, shapes, dtype, logging, no checkpoint)."""
        a = self.args
        return [
            f"model.preset={a.preset}",
            "data.mock=true",
            f"data.seq_length={a.seq}",
            f"model.max_seq_length={max(a.seq, 1)}",
            f"training.steps={steps}",
            f"training.global_batch_size={global_batch}",
            f"training.micro_batch_size={micro_batch}",
            f"training.recompute={recompute}",
            f"precision.dtype={a.dtype}",
            "schedule.warmup_steps=1",
            "logging.interval=1",
            "logging.tensorboard=false",
            "checkpoint.enabled=false",
            *a.override,
        ]

    def child(self, cmd: List[str], timeout: float, log_path: Path) -> int:
        """Run ``cmd`` from the repository root in its own session, output to ``log_path``;
        on timeout the whole session is killed. Returns the exit code (124 on timeout)."""
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        env.setdefault("OMP_NUM_THREADS", "1" if self.args.dry_run else "8")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                return proc.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return 124

    def write(self) -> None:
        """bench_gpu.json and bench_gpu.md, each written to a temporary sibling and renamed."""
        a = self.args
        doc = {
            "settings": {k: v for k, v in vars(a).items()},
            "device": self.device,
            "equivalence": self.equivalence,
            "refused_switch_sets": self.failed_sets,
            "switch_sets": self.switch_sets,
            "cells": [{**asdict(c), "name": c.name} for c in self.cells],
            "elapsed_s": time.monotonic() - self.start,
            "log": self.log_lines,
        }
        for name, text in (("bench_gpu.json", json.dumps(doc, indent=1)), ("bench_gpu.md", self.markdown())):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    # -------------------------------------------------------------- equivalence
    def check_equivalence(self) -> None:
        """Step 1: the switch sets of the matrix against all-off, on a 2-layer cut of the model."""
        a = self.args
        sets = sorted({c.switches for c in self.cells} - {"off"})
        variants = {"off": OFF, "off_repeat": OFF}
        variants.update({s: SWITCH_SETS[s] for s in sets})
        cfg_path = self.out / "equivalence.yaml"
        cfg_path.write_text("{}\n")
        seq = min(a.seq, a.equivalence_seq)
        overrides = [
            f"model.preset={a.preset}",
            f"model.num_layers={a.equivalence_layers}",
            "data.mock=true",
            f"data.seq_length={seq}",
            "training.steps=5",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            f"precision.dtype={a.dtype}",
            "optimizer.lr=3e-4",
            "schedule.warmup_steps=1",
            "logging.interval=1",
            "logging.tensorboard=false",
            "checkpoint.enabled=false",
            "checkpoint.lock=false",  # variants share the directory, one after another
            f"checkpoint.dir={self.out / 'equivalence_run'}",
            *[o for o in a.override if not o.startswith("model.num_layers=")],
        ]
        self.run_equivalence(cfg_path, variants, overrides, "equivalence")
        off = self.equivalence.get("off", {})
        if "steps" not in off:
            raise SystemExit(f"the all-off equivalence run failed: {off.get('error')}; see {self.out}/equivalence.log")
        checks = self.equivalence["checks"]
        failed = [s for s in sets if not checks[s]["ok"]]
        if failed:
            self.say(f"equivalence failed for {failed}: bisecting into single switches")
            self.run_equivalence(cfg_path, {"off": OFF, "off_repeat": OFF, **SINGLES}, overrides, "bisect")
            bad = [n for n in SINGLES if not checks[n]["ok"]]
            if "on" in failed and 0 < len(bad) < len(SINGLES):
                # Measure the defaults without the switches that failed, if that set passes.
                reduced = [DISABLE[n] for n in bad]
                self.run_equivalence(
                    cfg_path, {"off": OFF, "off_repeat": OFF, "on_reduced": reduced}, overrides, "reduced"
                )
                if checks["on_reduced"]["ok"]:
                    self.switch_sets["on"] = reduced
                    self.equivalence["on_measured_without"] = bad
                    self.say(f"'on' cells run without {bad}, which failed the check")
                    failed.remove("on")
        for s in failed:
            self.failed_sets[s] = json.dumps(checks[s])

    def run_equivalence(self, cfg_path: Path, variants: Dict[str, List[str]], overrides: List[str], tag: str) -> None:
        """Run ``variants`` in one child and record each against ``off``."""
        out = self.out / f"{tag}.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_variants",
            str(cfg_path),
            json.dumps({k: overrides + v for k, v in variants.items()}),
            str(out),
        ]
        self.say(f"{tag}: {len(variants)} variants of 5 steps ({', '.join(variants)})")
        t0 = time.monotonic()
        rc = self.child(cmd, min(self.left(), self.args.equivalence_timeout_s), self.out / f"{tag}.log")
        if rc != 0 or not out.is_file():
            raise SystemExit(f"{tag} check failed (exit {rc}); see {self.out / (tag + '.log')}")
        res = json.loads(out.read_text())
        self.device = res.pop("_device")
        on_gpu = self.device.get("total_memory_gib") is not None
        base = res["off"]["steps"] if "steps" in res.get("off", {}) else []
        noise = compare(base, res.get("off_repeat", {}).get("steps", base), CPU_TOL)
        tol = dict(GPU_TOL if on_gpu else CPU_TOL)
        for key in tol:
            tol[key] = max(tol[key], 3 * noise.get("max_rel_diff", {}).get(key, 0.0))
        checks = self.equivalence.setdefault("checks", {})
        for name, r in res.items():
            self.equivalence[name] = r
            if name in ("off", "off_repeat"):
                continue
            checks[name] = {"why": r["error"], "ok": False} if "error" in r else compare(base, r["steps"], tol)
            checks[name]["flags"] = r.get("flags")
            self.say(
                f"  {name}: {'ok' if checks[name]['ok'] else 'FAILED'} {checks[name].get('max_rel_diff', checks[name].get('why'))}"
            )
        self.equivalence["noise_" + tag] = noise.get("max_rel_diff")
        if tag == "equivalence":
            self.equivalence["noise_off_vs_off"] = noise.get("max_rel_diff")
        self.equivalence["seconds_" + tag] = time.monotonic() - t0

    # ------------------------------------------------------------------- cells
    def plan_memory_gib(self, overrides: List[str]) -> Optional[float]:
        """The plan's per-GPU memory for these overrides (``engine plan``'s formula)."""
        from engine.run_config import RUN_CHECKS, load_run_config
        from parallel.plan import GIB, make_plan

        cfg = load_run_config(None, overrides)
        gpu = "h100" if not self.args.dry_run else "cpu"  # the GPU kind only sets the capacity/peak
        plan = make_plan(cfg, 1, 1, gpu, on_cpu=self.args.dry_run, checks=RUN_CHECKS)
        return plan.gpu.total / GIB

    def estimate_s(self, cell: Cell, steps: int) -> float:
        """Seconds ``cell`` needs: start-up plus ``steps`` steps, from the cells measured so far
        (``--startup-guess-s`` and ``--first-step-guess-s`` before any)."""
        done = [c for c in self.cells if c.step_time_s]
        if done:
            same = [c for c in done if c.switches == cell.switches] or done
            ref = min(same, key=lambda c: abs(c.micro_batch - cell.micro_batch))
            step = ref.step_time_s / RECOMPUTE_COST[ref.recompute] * RECOMPUTE_COST[cell.recompute]
        else:
            step = self.args.first_step_guess_s
        return (self.startup_s or self.args.startup_guess_s) + steps * step

    def run_cell(self, cell: Cell) -> None:
        """Step 2 for one cell: the timed run (and its profile run when it is the first of its set)."""
        a = self.args
        if cell.switches in self.failed_sets:
            cell.status, cell.why = "refused", f"switch set {cell.switches} failed the equivalence check"
            return
        if cell.switches == "liger" and not self.equivalence.get("checks", {}).get("liger", {}).get("ok"):
            cell.status, cell.why = "refused", "liger not checked (liger-kernel not installed?)"
            return
        if a.global_batch % cell.micro_batch:
            cell.status, cell.why = "skipped", f"global batch {a.global_batch} is not a multiple of {cell.micro_batch}"
            return
        cell.grad_accumulation = a.global_batch // cell.micro_batch
        steps = a.warmup + a.timed
        overrides = self.base_overrides(cell.micro_batch, a.global_batch, steps, cell.recompute)
        overrides += self.switch_sets[cell.switches]
        cell.plan_mem_gib = self.plan_memory_gib(overrides)
        capacity = self.device.get("total_memory_gib")
        if capacity and cell.plan_mem_gib * PLAN_MARGIN > capacity:
            cell.status = "skipped"
            cell.why = (
                f"plan predicts {cell.plan_mem_gib:.1f} GiB; with the plan's {PLAN_MARGIN - 1:.0%} "
                f"under-prediction margin that exceeds the GPU's {capacity:.1f} GiB"
            )
            self.say(f"{cell.name}: {cell.why}")
            return
        profiled = cell.switches not in {c.switches for c in self.cells if c.profile}
        in_cell_profile = profiled and cell.grad_accumulation <= a.profile_micro
        if in_cell_profile:
            steps += 1  # one more step, profiled, left out of the timed ones
        need = self.estimate_s(cell, steps)
        if profiled and not in_cell_profile:
            need += self.profile_estimate_s()
        if need > self.left():
            cell.status = "skipped"
            cell.why = f"would need ~{need:.0f} s, {self.left():.0f} s of the budget left"
            self.say(f"{cell.name}: {cell.why}")
            return
        run_dir = self.out / cell.name
        overrides.append(f"checkpoint.dir={run_dir}")
        if in_cell_profile:  # the whole step is small: profile one extra step in this run
            overrides += [f"training.steps={steps}", *self.profile_overrides(steps, run_dir)]
        cfg_path = run_dir / "bench.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text("{}\n")
        metrics = run_dir / "logs" / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()  # a rerun into the same --out starts its records afresh
        cell.command = [sys.executable, "-m", "engine", "train", str(cfg_path), *overrides]
        self.say(
            f"{cell.name}: {steps} steps of {a.global_batch} x {a.seq} tokens ({cell.grad_accumulation} micro-batches), ~{need:.0f} s"
        )
        t0 = time.monotonic()
        rc = self.child(cell.command, min(self.left(), 2 * need + 60), run_dir / "train.log")
        cell.wall_s = time.monotonic() - t0
        if rc != 0:
            cell.status = "timed out" if rc == 124 else "failed"
            cell.why = f"exit {rc}; " + tail(run_dir / "train.log")
            self.say(f"{cell.name}: {cell.status} ({cell.why[:200]})")
            return
        self.read_metrics(cell, metrics)
        if in_cell_profile:
            cell.profile = self.read_profile(run_dir / "profile", cell.grad_accumulation, cell.grad_accumulation)
        elif profiled:
            self.profile_cell(cell)
        cell.status = "measured"
        self.say(
            f"{cell.name}: step {cell.step_time_s:.3f} s, {cell.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
            f"MFU {fmt_pct(cell.mfu)}, peak {cell.peak_mem_gib:.2f} GiB (plan {cell.plan_mem_gib:.2f} GiB)"
        )

    def profile_overrides(self, step: int, run_dir: Path) -> List[str]:
        """A torch.profiler window on ``step``, written under ``run_dir/profile``."""
        return [
            f"profile.start_step={step}",
            f"profile.end_step={step}",
            "profile.torch_profiler=true",
            "profile.top_ops=15",
            f"profile.dir={run_dir / 'profile'}",
        ]

    def profile_cell(self, cell: Cell) -> None:
        """Step 3: one profiled step of ``--profile-micro`` micro-batches in a run of its own."""
        a = self.args
        run_dir = self.out / (cell.name + "-profile")
        micro = a.profile_micro
        overrides = self.base_overrides(cell.micro_batch, cell.micro_batch * micro, 2, cell.recompute)
        overrides += self.switch_sets[cell.switches] + [f"checkpoint.dir={run_dir}"]
        overrides += self.profile_overrides(2, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "bench.yaml").write_text("{}\n")
        cmd = [sys.executable, "-m", "engine", "train", str(run_dir / "bench.yaml"), *overrides]
        need = self.profile_estimate_s()
        if need > self.left():
            cell.profile = {"status": "skipped", "why": f"would need ~{need:.0f} s, {self.left():.0f} s left"}
            return
        self.say(f"{cell.name}: profiling one step of {micro} micro-batches")
        t0 = time.monotonic()
        rc = self.child(cmd, min(self.left(), 2 * need + 60), run_dir / "train.log")
        self.profile_s = max(self.profile_s or 0.0, time.monotonic() - t0)
        if rc != 0:
            cell.profile = {"status": "failed", "why": f"exit {rc}; " + tail(run_dir / "train.log"), "command": cmd}
            return
        cell.profile = self.read_profile(run_dir / "profile", micro, cell.grad_accumulation or micro)
        cell.profile["command"] = cmd

    def profile_estimate_s(self) -> float:
        """Seconds of a profile run: the longest measured, else start-up plus 60 s (two short
        steps and the trace export)."""
        return self.profile_s or (self.startup_s or self.args.startup_guess_s) + 60

    def read_metrics(self, cell: Cell, path: Path) -> None:
        """Median of the timed steps; MFU from the median tokens/s (engine.metrics.mfu)."""
        from engine.metrics import gpu_key, mfu
        from engine.run_config import load_run_config

        rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        rows = [r for r in rows if r.get("split") == "train"]
        timed = rows[self.args.warmup : self.args.warmup + self.args.timed]
        if not timed:
            raise SystemExit(f"{cell.name}: no timed steps in {path}")
        cell.step_times_s = [r["step_time"] for r in timed]
        cell.step_time_s = statistics.median(cell.step_times_s)
        tokens = self.args.global_batch * self.args.seq
        cell.tokens_per_s_per_gpu = tokens / cell.step_time_s
        cfg = load_run_config(None, self.base_overrides(cell.micro_batch, self.args.global_batch, 1, cell.recompute))
        gpu = gpu_key(str(self.device.get("name", "")))
        cell.mfu = mfu(cell.tokens_per_s_per_gpu, cfg.model.flops_per_token(self.args.seq), gpu, "bf16")
        cell.peak_mem_gib = max(r["peak_mem_gib"] for r in rows)
        cell.loss_last = rows[-1].get("loss")
        # Start-up (imports, build, data, compile of the first step beyond a normal step): what
        # the next cells' estimates add to their steps.
        startup = (cell.wall_s or 0.0) - sum(r["step_time"] for r in rows)
        self.startup_s = max(self.startup_s or 0.0, startup)

    def read_profile(self, prof_dir: Path, micro_in_window: int, micro_per_step: int) -> Dict[str, object]:
        """Class shares of the window and of a step of ``micro_per_step`` micro-batches."""
        sys.path.insert(0, str(REPO / "examples"))
        from kernel_breakdown import CLASSES, breakdown

        traces = sorted(prof_dir.glob("trace_rank*.json"))
        if not traces:
            return {"status": "failed", "why": f"no trace in {prof_dir}"}
        by_class, wall, top, source = breakdown(str(traces[0]))
        total = sum(by_class.values()) or 1.0
        scale = micro_per_step / micro_in_window
        scaled = {c: by_class[c] * (1.0 if c == "optimizer" else scale) for c in CLASSES}
        scaled_total = sum(scaled.values()) or 1.0
        return {
            "status": "measured",
            "source": source,
            "trace": str(traces[0]),
            "micro_batches_in_window": micro_in_window,
            "window_wall_ms": wall / 1e3,
            "window_kernel_ms": {c: by_class[c] / 1e3 for c in CLASSES},
            "window_busy": total / wall if wall else None,
            "window_shares": {c: by_class[c] / total for c in CLASSES},
            "step_shares": {c: scaled[c] / scaled_total for c in CLASSES},
            "top_kernels": [{"name": n[:160], "ms": d / 1e3, "calls": k} for n, d, k in top[:15]],
        }

    # ---------------------------------------------------------------- markdown
    def markdown(self) -> str:
        """The table of cells and the equivalence results."""
        a = self.args
        dev = self.device
        lines = [
            f"# bench_gpu: {a.preset}, sequence {a.seq}, global batch {a.global_batch}, {a.dtype}",
            "",
            f"Device: {dev.get('name', '?')} ({fmt_num(dev.get('total_memory_gib'), '.1f')} GiB), torch {dev.get('torch', '?')}. "
            f"Median of {a.timed} timed steps after {a.warmup} warm-up step(s); MFU against the dense bf16 peak "
            f"(engine/metrics.py). Profile shares: kernel time per class in a step of the global batch "
            f"(window of {a.profile_micro} micro-batches, non-optimizer classes scaled to the step's micro-batches).",
            "",
            "| cell | switches | micro-batch | recompute | micro-batches/step | step time | tokens/s/GPU | MFU | "
            "peak memory | plan memory | GEMM | attention | optimizer | communication | other | GPU busy (window) | status |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for c in self.cells:
            shares = (c.profile or {}).get("step_shares") or {}
            busy = (c.profile or {}).get("window_busy")
            status = c.status + (f": {c.why}" if c.why else "")
            if c.profile and c.profile.get("status") != "measured":
                status += f" (profile {c.profile.get('status')}: {c.profile.get('why', '')[:80]})"
            lines.append(
                f"| {c.name} | {c.switches} | {c.micro_batch} | {c.recompute} | {fmt_num(c.grad_accumulation, 'd')} | "
                f"{fmt_num(c.step_time_s, '.3f', ' s')} | {fmt_num(c.tokens_per_s_per_gpu, ',.0f')} | {fmt_pct(c.mfu)} | "
                f"{fmt_num(c.peak_mem_gib, '.2f', ' GiB')} | {fmt_num(c.plan_mem_gib, '.2f', ' GiB')} | "
                + " | ".join(
                    fmt_pct(shares.get(k)) for k in ("gemm", "attention", "optimizer", "communication", "other")
                )
                + f" | {fmt_pct(busy)} | {status.replace('|', '/')} |"
            )
        lines += ["", "## Equivalence (5 steps, 2-layer cut, against every switch off)", ""]
        lines.append(f"off vs off (noise): {self.equivalence.get('noise_off_vs_off')}")
        lines.append("")
        for name, check in self.equivalence.get("checks", {}).items():
            verdict = "ok" if check.get("ok") else "FAILED"
            detail = check.get("max_rel_diff", check.get("why"))
            lines.append(
                f"- {name}: {verdict}; max relative difference {detail}; tolerance {check.get('tolerance')}; "
                f"in effect: {check.get('flags')}"
            )
        if self.equivalence.get("on_measured_without"):
            lines.append("")
            lines.append(
                f"'on' cells were measured without {self.equivalence['on_measured_without']} (failed the check)."
            )
        if self.failed_sets:
            lines.append("")
            lines.append(f"Refused (no figures reported): {', '.join(self.failed_sets)}")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------------- run
    def run(self) -> int:
        """Equivalence, then the cells in order; files written after each."""
        self.say(f"budget {self.args.budget_s:.0f} s, matrix {', '.join(c.name for c in self.cells)}")
        self.check_equivalence()
        self.write()
        for cell in self.cells:
            self.run_cell(cell)
            self.write()
        measured = [c for c in self.cells if c.status == "measured"]
        self.say(f"done: {len(measured)} of {len(self.cells)} cells measured; {self.out / 'bench_gpu.md'}")
        print((self.out / "bench_gpu.md").read_text(), flush=True)
        return 0 if measured else 1


def tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a log, joined (for a failure's reason)."""
    try:
        text = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " / ".join(text[-lines:])[-400:]


def fmt_num(value, spec: str, unit: str = "") -> str:
    """``value`` formatted, or an en dash when missing."""
    return "–" if value is None else format(value, spec) + unit


def fmt_pct(value) -> str:
    """A fraction as a percentage with one decimal, or an en dash."""
    return "–" if value is None else f"{100 * value:.1f}%"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line settings; ``--dry-run`` replaces the GPU sizes with a CPU-sized plumbing check."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory of bench_gpu.json/.md and the runs")
    ap.add_argument("--preset", default="frankenstallm-3b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step (>= 64 for the issue)")
    ap.add_argument("--matrix", default=DEFAULT_MATRIX, help="MICRO_BATCH:RECOMPUTE:SWITCHES,... in priority order")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--timed", type=int, default=2, help="timed steps (median)")
    ap.add_argument("--profile-micro", type=int, default=2, help="micro-batches in the profiled step")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole run")
    ap.add_argument("--startup-guess-s", type=float, default=60.0, help="start-up of a child before one is measured")
    ap.add_argument("--first-step-guess-s", type=float, default=30.0, help="step time before one is measured")
    ap.add_argument("--equivalence-layers", type=int, default=2)
    ap.add_argument("--equivalence-seq", type=int, default=1024)
    ap.add_argument("--equivalence-timeout-s", type=float, default=240.0)
    ap.add_argument("--override", action="append", default=[], help="dotted.key=value for every run (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny-llama, fp32, short sequences")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.preset, args.seq, args.global_batch, args.dtype = "tiny-llama", 64, 4, "fp32"
        args.matrix = "2:none:on" if args.matrix == DEFAULT_MATRIX else args.matrix
        args.startup_guess_s, args.first_step_guess_s, args.equivalence_seq = 20.0, 1.0, 64
    for name in ("seq", "global_batch", "timed", "profile_micro", "equivalence_layers", "equivalence_seq"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.budget_s <= 0:
        ap.error("--warmup must be >= 0 and --budget-s > 0")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point (``_variants`` is the child mode of the equivalence check)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_variants"]:
        if len(argv) != 4:
            raise SystemExit("usage: bench_gpu.py _variants CONFIG VARIANTS_JSON OUT")
        run_variants(argv[1], json.loads(argv[2]), argv[3])
        return 0
    return Bench(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
