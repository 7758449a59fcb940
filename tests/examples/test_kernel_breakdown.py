"""examples/kernel_breakdown.py on a hand-made Chrome trace with known kernel times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_breakdown_shares(tmp_path):
    kernels = [  # name, start us, duration us
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 0, 500),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", 500, 200),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 700, 150),
        ("void at::native::vectorized_elementwise_kernel<4, silu>", 850, 100),
        ("void at::native::reduce_kernel<512, 1, rms_norm>", 950, 50),
    ]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events.append({"name": "ProfilerStep#5", "ts": 0, "dur": 1250, "cat": "user_annotation"})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "kernel_breakdown.py"), str(trace)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "GPU kernel time 1.0 ms, window wall time 1.2 ms" in out  # 1000 us of 1250 us
    shares = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:4]}
    assert shares == {"gemm": "70.0%", "attention": "15.0%", "other": "15.0%"}
    # other kernels 150 us + idle 250 us of 1250 us wall
    assert "outside GEMM and attention (other kernels + GPU idle): 32.0% of wall time" in out
