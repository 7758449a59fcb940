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
        ("void at::native::(anonymous namespace)::fused_adamw_kernel<float>", 1000, 60),
        ("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>", 1060, 20),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 1080, 20),
    ]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events.append({"name": "ProfilerStep#5", "ts": 0, "dur": 1350, "cat": "user_annotation"})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "kernel_breakdown.py"), str(trace)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "GPU kernel time 1.1 ms, window wall time 1.4 ms" in out  # 1100 us of 1350 us
    shares = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:6]}
    assert shares == {
        "gemm": "63.6%",  # 700 / 1100
        "attention": "13.6%",
        "optimizer": "7.3%",  # fused AdamW + multi-tensor (grad norm) 80 us
        "communication": "1.8%",
        "other": "13.6%",
    }
    # optimizer 80 + communication 20 + other 150 us + idle 250 us of 1350 us wall
    assert "outside GEMM and attention (other kernels + GPU idle): 37.0% of wall time" in out


def test_cpu_only_trace_is_broken_down_by_cpu_ops(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    from kernel_breakdown import breakdown

    events = [
        {"cat": "cpu_op", "name": "aten::addmm", "ts": 0, "dur": 30},
        {"cat": "cpu_op", "name": "aten::_scaled_dot_product_flash_attention_for_cpu", "ts": 30, "dur": 10},
        {"cat": "cpu_op", "name": "aten::_fused_adamw_", "ts": 40, "dur": 5},
        {"cat": "cpu_op", "name": "c10d::allreduce_", "ts": 45, "dur": 5},
    ]
    trace = tmp_path / "cpu.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    by_class, wall, top, source = breakdown(str(trace))
    assert source == "cpu_ops" and wall == 50
    assert by_class == {"gemm": 30, "attention": 10, "optimizer": 5, "communication": 5, "other": 0}
