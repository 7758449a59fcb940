"""CPU_TINY=1 of the post-training launchers: SFT then ORPO, two CPU processes each, on data the
launchers build from the bundled sample (not the GPU run's data and checkpoints)."""

from __future__ import annotations

import pytest

from tests.conftest import step_metrics
from tests.launchers.test_launchers import _env, _run


@pytest.mark.slow  # ~27 s: two launcher runs with their tokenizer and data builds
def test_cpu_tiny_sft_then_orpo_from_its_checkpoint(tmp_path):
    data = tmp_path / "tiny_data"
    sft_dir, orpo_dir = tmp_path / "sft", tmp_path / "orpo"
    sft = _run(
        ["launchers/sft_3b_b200.sh"],
        _env(tmp_path, CPU_TINY="1", TINY_DATA=str(data), RUN_DIR=str(sft_dir)),
        timeout=300,
    )
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    assert "--nproc-per-node=2" in sft.stdout and "world 2, dp 2" in sft.stdout
    assert "replay: 30% of training" in sft.stdout  # the tiny variant keeps the replay of the real one
    assert [r["step"] for r in step_metrics(sft_dir)] == [1, 2, 3]
    sft_ckpt = sft_dir / "checkpoints" / "iter_0000003"
    assert (sft_ckpt / "engine_meta.json").is_file()

    orpo = _run(
        ["launchers/orpo_3b_b200.sh"],
        _env(tmp_path, CPU_TINY="1", TINY_DATA=str(data), RUN_DIR=str(orpo_dir), SFT_CKPT=str(sft_ckpt)),
        timeout=300,
    )
    assert orpo.returncode == 0, orpo.stdout[-3000:] + orpo.stderr[-3000:]
    assert "building the tiny tokenizer" not in orpo.stdout  # built once, reused
    assert f"initialised weights from {sft_ckpt}" in orpo.stdout
    assert [r["step"] for r in step_metrics(orpo_dir)] == [1, 2, 3]
    assert (orpo_dir / "checkpoints" / "iter_0000003" / "engine_meta.json").is_file()
