#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU checks issues 4 and 6 ask for, as one short script for a lent GPU machine.
# (The device tool runs it in the repo root, with $OUT as the folder whose files come back.)
#   bash bench/gpu_check.sh            # about 5 minutes on one H200; every log lands in $OUT (default ./runs/gpu)
# What it shows:
#   1. bench.bench_sample on cuda/bf16: sample.py vs the per-prompt pipeline (target >= 20x), raw generate, padding
#   2. bench.bench_train on cuda: KL step cost, padding share, bf16 MFU of a GPT-2-small step (target >= 30%)
#   3. train.py under torchrun with NCCL (1 rank), bf16 autocast, and a sample.py run from its output: the GPU paths
#      the CPU test suite cannot reach
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0
step() {  # step NAME TIMEOUT CMD...: run one check, keep its whole log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 8 "$OUT/$name.log"
    echo "== $name: rc=$rc"
    [ $rc -eq 0 ] || status=1
}
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
step bench_sample 150 $PY -m bench.bench_sample
step bench_train 180 $PY -m bench.bench_train
$PY sample.py --model toy/model --prompts toy/prompts/train.jsonl --out "$OUT/tmp/samples.jsonl" --num-samples 2 \
    --no-progress --overwrite >"$OUT/prep.log" 2>&1 &&
    $PY feedback.py --method alt-rm --scorer hf:toy/scorer --samples "$OUT/tmp/samples.jsonl" \
        --out "$OUT/tmp/pool.jsonl" >>"$OUT/prep.log" 2>&1 || { tail "$OUT/prep.log"; status=1; }
step train_nccl 120 $PY -m torch.distributed.run --nproc_per_node 1 train.py --data "$OUT/tmp/pool.jsonl" \
    --model toy/model --out "$OUT/tmp/model" --max-samples 256 --precision bf16 --overwrite
step sample_trained 60 $PY sample.py --model "$OUT/tmp/model" --prompts toy/prompts/val.jsonl \
    --out "$OUT/tmp/val_samples.jsonl" --condition "Lowest Toxicity" --no-progress --overwrite
rm -rf "$OUT/tmp"  # only the logs come back
exit $status
