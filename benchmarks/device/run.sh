#!/usr/bin/env bash
# The device check, in one command on the GPU machine (after prepare.sh here):
#   bash benchmarks/device/run.sh                 # there: carry=[".kit"], timeout_s >= 540
#   bash benchmarks/device/run.sh --dry-run       # here, on the CPU: the same steps at tiny sizes
# Steps, each writing its record to $OUT as it finishes (a run cut short returns what ran):
#   0. install the kit's wheels (a temporary target on PYTHONPATH), restore the model to fp32,
#      record the machine (device.json: GPU, versions, pretrained weights already in its caches)
#   a. python -m pytest -m cuda tests/test_cuda.py           -> cuda-tests.xml (JUnit)
#   b. benchmarks/train_step.py, bert-base shape, batch 32 x 128 and 16 x 384, bf16 and fp32: full FT,
#      BitFit, lean BitFit, LoRA r=8 side by side                -> train-step.json
#   c. the SQuAD curve (benchmarks/device/squad_curve.py)       -> squad-records.tar.gz
# The whole script keeps to KIT_BUDGET_S seconds (default 450: a rerun fits the machine's 15 minutes).
# --dry-run: CPU, the CUDA tests run on the CPU (BITFIT_CUDA_TESTS_DEVICE=cpu), a tiny shape for step
# times, the test fixtures' five SQuAD questions; the wheels are installed for Python 3.12 into a
# target this CPU's Python does not import (it keeps its own packages).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
KIT=.kit
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --kit) KIT=$2; shift ;;
    *) echo "run.sh: unknown argument $1; usage: run.sh [--dry-run] [--kit DIR]" >&2; exit 2 ;;
  esac
  shift
done
if [ ! -d "$KIT/wheels" ] || [ ! -f "$KIT/model/model.fp16.safetensors.xz" ]; then
  echo "run.sh: no kit in $KIT; build it with bash benchmarks/device/prepare.sh first" >&2
  exit 2
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
START=$(date +%s)
BUDGET=${KIT_BUDGET_S:-450}
PY=${PYTHON:-python3}
left() { echo $((START + BUDGET - $(date +%s))); }
step() { echo "== [$(($(date +%s) - START)) s] $*"; }
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_CACHE="$WORK/hf-datasets"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "0. kit: wheels, model, machine (dry run: $DRY)"
if [ "$DRY" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site312" --python-version 3.12 \
    --only-binary=:all: "$KIT"/wheels/*.whl || { echo "run.sh: the kit's wheels do not install as a set"; exit 1; }
else
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$KIT"/wheels/*.whl || { echo "run.sh: the kit's wheels do not install"; exit 1; }
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
"$PY" benchmarks/device/model_copy.py restore "$KIT/model" "$WORK/model" || exit 1
"$PY" benchmarks/device/device_info.py "$OUT/device.json"
if [ "$DRY" = 1 ]; then
  export BITFIT_CUDA_TESTS_DEVICE=cpu
  SHAPES=("--shape tiny --batch 4 --seq 16")
  PRECISIONS=(fp32)
  STEP_ARGS=(--device cpu --repeats 1)
  SQUAD_TRAIN=tests/fixtures/squad/official.json
  SQUAD_DEV=tests/fixtures/squad/flat.jsonl
  CURVE_ARGS=(--seeds 1 --fractions 0.6 1 --epochs 1 1 --max_eval_samples 0 -- --max_seq_length 64 --doc_stride 16
              --use_cpu true)
else
  SHAPES=("--shape bert-base --batch 32 --seq 128" "--shape bert-base --batch 16 --seq 384")
  PRECISIONS=(bf16 fp32)
  STEP_ARGS=(--device cuda --repeats 10)
  for f in train dev; do
    if [ -f "$KIT/squad/$f-v1.1.rebuilt.json.xz" ]; then
      "$PY" -c "import lzma, shutil, sys
with lzma.open(sys.argv[1]) as a, open(sys.argv[2], 'wb') as b: shutil.copyfileobj(a, b)" \
        "$KIT/squad/$f-v1.1.rebuilt.json.xz" "$WORK/$f.json"
    fi
  done
  SQUAD_TRAIN=$WORK/train.json
  SQUAD_DEV=$WORK/dev.json
  CURVE_ARGS=(-- --tf32 true)
fi

step "a. CUDA tests"
timeout $(( $(left) > 150 ? 150 : $(left) )) "$PY" -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml "$OUT/cuda-tests.xml" tests/test_cuda.py
echo "pytest exit code $?"

step "b. step time and memory"
for shape in "${SHAPES[@]}"; do
  for precision in "${PRECISIONS[@]}"; do
    name=$(echo "$shape" | awk '{print $2 "-b" $4 "x" $6}')-$precision
    # shellcheck disable=SC2086
    timeout $(( $(left) > 120 ? 120 : $(left) )) "$PY" benchmarks/train_step.py $shape --precision "$precision" \
      --configs full bitfit lean lora --paths trainer "${STEP_ARGS[@]}" --json "$WORK/step-$name.json"
    echo "train_step $name exit code $?"
    "$PY" -c "import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); d = json.loads(out.read_text()) if out.exists() else {}
for p in sys.argv[2:]:
    if pathlib.Path(p).exists(): d[pathlib.Path(p).stem.removeprefix('step-')] = json.loads(pathlib.Path(p).read_text())
tmp = out.with_name('.' + out.name); tmp.write_text(json.dumps(d, indent=1)); tmp.replace(out)" \
      "$OUT/train-step.json" "$WORK/step-$name.json"
  done
done

step "c. SQuAD curve"
if [ -f "$SQUAD_TRAIN" ] && [ -f "$SQUAD_DEV" ]; then
  "$PY" benchmarks/device/squad_curve.py --model "$WORK/model" --train_file "$SQUAD_TRAIN" \
    --validation_file "$SQUAD_DEV" --output_dir "$WORK/squad" --tar "$OUT/squad-records.tar.gz" \
    --deadline_s "$(( $(left) - 15 ))" "${CURVE_ARGS[@]}"
  echo "squad_curve exit code $?"
else
  echo "no SQuAD data in the kit: curve skipped"
fi
step "done; records in $OUT: $(ls "$OUT" | tr '\n' ' ')"
