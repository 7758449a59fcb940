#!/usr/bin/env bash
# The main job on the bundled sample, from a fresh machine: set up .venv (torch, megatron-core,
# the engine), then run the pipeline of examples/configs/quickstart.yaml:
#   tokenizer (+ lint) -> preprocessing -> pretraining of tiny-llama on 2 CPU processes (TP=2)
#   -> SFT with 30% replay -> ORPO -> Hugging Face export (logit parity) -> GGUF
#   -> sample generations before/after ORPO -> evaluation -> examples/out/report.{md,html,json}
# Re-running skips the stages that are finished. Options go to `python -m engine pipeline`:
#   bash examples/quickstart.sh --steps-scale 0.1        # a shorter run
#   bash examples/quickstart.sh --out /tmp/qs --force    # elsewhere, every stage again
#   bash examples/quickstart.sh --corpus my.jsonl --preset tiny-llama
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m engine pipeline examples/configs/quickstart.yaml "$@"
