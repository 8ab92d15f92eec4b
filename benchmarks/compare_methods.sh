#!/usr/bin/env bash
# full / BitFit / BEFT / LoRA r=8 on the packaged all-MiniLM-L6-v2, each under its own recipe (recipes.py) and the
# same epochs per task: MRPC, STS-B, RTE (1,000 training examples, dev subsets of <= 500), the WSJ POS sample and
# CoNLL-2000 chunking (1,000 training sentences), 3 epochs, seeds 1-3; then SQuAD v1.1 at 1% of the training
# questions (876), 3 epochs, seed 1, scored on a fixed 1,000-question dev subset (full FT at BERT's SQuAD rate
# 5e-5). Two sweep workers side by side, one CPU thread each (a 2-core machine); a killed run resumes where it
# was when this script is started again.
#   bash benchmarks/compare_methods.sh [OUT]   (OUT: benchmarks/results/compare-methods)
set -euo pipefail
OUT=${1:-benchmarks/results/compare-methods}
DATA=${SHARED_DATA:-../shared/data}
CORPORA=$DATA/pos/nltk_data/corpora
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
GRID=(--methods full bitfit beft lora --seeds 1 2 3 --full_lrs 2e-5 --bias_lrs 1e-3 --lora_lrs 4e-4)
COMMON=(--num_train_epochs 3 --train_eval_samples 0 --save_full_model true --per_device_eval_batch_size 64)
worker() {
  local shard=$1
  python -m bitfit_tasks.sweep --tasks mrpc stsb rte "${GRID[@]}" --output_dir "$OUT/glue" --shard "$shard" -- \
    --data_dir "$DATA/glue" --max_train_samples 1000 --max_eval_samples 500 "${COMMON[@]}"
  python -m bitfit_tasks.sweep --runner pos --tasks wsj "${GRID[@]}" --output_dir "$OUT/pos" --shard "$shard" -- \
    --treebank "$CORPORA/treebank.zip" --max_train_samples 1000 --unknown_tags count_wrong "${COMMON[@]}"
  python -m bitfit_tasks.sweep --runner pos --tasks conll2000-chunk "${GRID[@]}" --output_dir "$OUT/chunk" \
    --shard "$shard" -- --train_file "$CORPORA/conll2000.zip::conll2000/train.txt" \
    --validation_file "$CORPORA/conll2000.zip::conll2000/test.txt" --tag_column 2 --max_train_samples 1000 \
    --max_eval_samples 500 --unknown_tags count_wrong "${COMMON[@]}"
  python -m bitfit_tasks.sweep --runner squad --fractions 0.01 --methods full bitfit beft lora --seeds 1 \
    --full_lrs 5e-5 --bias_lrs 1e-3 --lora_lrs 4e-4 --output_dir "$OUT/squad" --shard "$shard" -- \
    --train_file "$DATA/squad/train-v1.1.rebuilt.json" --validation_file "$DATA/squad/dev-v1.1.rebuilt.json" \
    --max_eval_samples 1000 "${COMMON[@]}"
}
worker 0/2 > "$OUT.worker0.log" 2>&1 &
worker 1/2 > "$OUT.worker1.log" 2>&1 &
wait
