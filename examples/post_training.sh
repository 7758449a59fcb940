#!/usr/bin/env bash
# Post-training on the bundled sample, CPU-sized (a few minutes on 2 cores):
#   1. tokenizer + pretraining data (as the quickstart), pretrain tiny-llama,
#   2. SFT and preference data from the Korean Constitution's articles
#      (examples/make_post_training_data.py -> preprocess --kind sft / --kind preference),
#   3. SFT from the pretrain checkpoint with 30% pretraining replay (by loss tokens),
#   4. ORPO from the SFT checkpoint (lambda 1.0: at this size 0.25, the seed's value, leaves the
#      NLL term dominant); held-out preference accuracy (valid/rewards/accuracies) is logged,
#   5. the lineage of the final checkpoint.
#   NPROC=2 bash examples/post_training.sh    # two ranks (data parallel) with torchrun
set -euo pipefail
cd "$(dirname "$0")/.."
source launchers/setup_env.sh

OUT=examples/out/post_training
NPROC="${NPROC:-1}"
rm -rf "$OUT/pretrain" "$OUT/sft" "$OUT/orpo"
train() {
  if [ "$NPROC" -gt 1 ]; then
    python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m engine train "$@"
  else
    python -m engine train "$@"
  fi
}

echo "== 1/5 tokenizer and pretraining data"
python -m engine tokenizer train --input examples/data/sample.jsonl --output-dir "$OUT/tokenizer" --vocab-size 4000
python -m engine preprocess --input examples/data/sample.jsonl --tokenizer "$OUT/tokenizer" \
  --output-prefix "$OUT/data/pretrain" --no-progress

echo "== 2/5 SFT and preference data (ChatML)"
python examples/make_post_training_data.py --out-dir "$OUT/raw"
python -m engine preprocess --kind sft --input "$OUT/raw/sft.jsonl" --tokenizer "$OUT/tokenizer" \
  --output-prefix "$OUT/data/sft" --seq-length 256 --chat-template chatml
python -m engine preprocess --kind preference --input "$OUT/raw/preference.jsonl" --tokenizer "$OUT/tokenizer" \
  --output-prefix "$OUT/data/preference" --seq-length 256 --chat-template chatml

echo "== 3/5 pretrain"
train examples/configs/post_training.yaml objective.name=pretrain "data.paths=[$OUT/data/pretrain]" \
  training.steps=200 optimizer.lr=3e-3 optimizer.min_lr=3e-4 checkpoint.dir=$OUT/pretrain

echo "== 4/5 SFT with 30% replay"
train examples/configs/post_training.yaml objective.name=sft "data.paths=[$OUT/data/sft]" \
  "data.replay_paths=[$OUT/data/pretrain]" data.replay_ratio=0.3 training.steps=100 \
  optimizer.lr=2e-3 optimizer.min_lr=2e-4 checkpoint.dir=$OUT/sft \
  checkpoint.init_from=$OUT/pretrain/checkpoints/iter_0000200

echo "== 5/5 ORPO"
train examples/configs/post_training.yaml objective.name=orpo "data.paths=[$OUT/data/preference]" \
  objective.orpo.weight=1.0 training.steps=100 training.eval_interval=25 \
  optimizer.lr=2e-3 optimizer.min_lr=2e-4 checkpoint.dir=$OUT/orpo \
  checkpoint.init_from=$OUT/sft/checkpoints/iter_0000100

python -c "
from engine.checkpoint import read_lineage
for e in read_lineage('$OUT/orpo/checkpoints/iter_0000100'):
    print(f\"lineage: {e['objective']:>8} {e['iteration']:>5} steps  {e['init_from']}\")"
