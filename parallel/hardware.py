"""Vendor figures of the GPUs the engine plans for and measures against (no code, no imports):
``engine.metrics`` reads the peaks for MFU, ``parallel.plan`` the peaks and memory sizes."""

from __future__ import annotations

# Dense peak TFLOP/s per GPU from the vendors' data sheets (SXM parts, no sparsity).
PEAK_TFLOPS = {
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "mxfp8": 4500.0, "fp32": 75.0},
    "gb200": {"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0, "mxfp8": 5000.0, "fp32": 80.0},
}

# Memory per GPU in GB as the vendors state it (NVIDIA data sheets); the driver reports a
# little less, which the planner's reserve covers.
GPU_MEMORY_GB = {"h100": 80.0, "h200": 141.0, "b200": 180.0}
