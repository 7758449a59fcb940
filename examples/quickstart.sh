#!/usr/bin/env bash
# The main job on the bundled sample, from a fresh machine:
#   1. set up .venv (torch, megatron-core, the engine),
#   2. train a SentencePiece tokenizer (byte fallback) on examples/data/sample.jsonl and lint it,
#   3. tokenize the corpus into megatron-core .bin/.idx files,
#   4. pretrain tiny-llama on it (CPU over gloo, or GPUs over NCCL) and validate.
# Re-running it reuses the environment and starts a fresh run in examples/out/.
#   NPROC=2 bash examples/quickstart.sh      # two ranks (data parallel) with torchrun
#   STEPS=50 bash examples/quickstart.sh     # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh

OUT=examples/out
NPROC="${NPROC:-1}"
STEPS="${STEPS:-300}"
rm -rf "$OUT/run"

echo "== 1/3 tokenizer"
python -m engine tokenizer train --input examples/data/sample.jsonl --output-dir "$OUT/tokenizer" --vocab-size 4000

echo "== 2/3 preprocess"
python -m engine preprocess --input examples/data/sample.jsonl --tokenizer "$OUT/tokenizer" \
  --output-prefix "$OUT/data/sample" --workers 2

echo "== 3/3 pretrain tiny-llama ($NPROC process(es), $STEPS steps)"
if [ "$NPROC" -gt 1 ]; then
  python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m engine train \
    examples/configs/quickstart.yaml "training.steps=$STEPS"
else
  python -m engine train examples/configs/quickstart.yaml "training.steps=$STEPS"
fi
python examples/summarize_metrics.py "$OUT/run"
echo "logs: $OUT/run/logs (metrics.jsonl, tensorboard/)  checkpoints: $OUT/run/checkpoints"
