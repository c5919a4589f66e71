#!/usr/bin/env bash
# The GPU checks of the real-size work, in one run on one GPU (docs/training.md, "On a GPU"):
#   1. bench/nccl_check.py: a CPU tensor in an NCCL group fails; medift's collectives work;
#   2. bench/real_size.py, full 11B: parameter counts; training steps per checkpointing mode
#      (as shipped / fixed / off: step time, samples/s, tokens/s, MFU, HFU, peak GPU memory,
#      host memory of the process); padded vs real-tile vision; letter scoring at batch 8, 32;
#   3. the paper's job through the real command lines on that checkpoint: `medift.train`
#      (bf16, batch 2, vision,fusion, ZeRO-2, checkpointing: warm-up, main stage, validation,
#      save) and `medift.evaluate` of the tuned model (letter scoring);
#   4. as time allows (DEADLINE seconds, default 520, from the start): host memory of a
#      torchrun rank loading the checkpoint bf16 onto the GPU (bench/load_memory.py).
#
#   bash bench/gpu_checks.sh [OUT_DIR]        (OUT_DIR: $OUT, else results/bench/gpu)
#
# Needs torch with CUDA, transformers and peft; DeepSpeed and the pure-Python packages it needs
# are installed from .whl/ when that folder exists (a machine without them; docs/training.md).
# SIZE=reduced runs the same steps at reduced size (how this script is tested on a CPU, with
# DS_ACCELERATOR=cpu and no NCCL check). Each stage has a time limit; a stage that fails or runs
# out of time is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-results/bench/gpu}}
size=${SIZE:-full}
work=${WORK_DIR:-/tmp/medift-gpu-checks}
mkdir -p "$out" "$work"
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl \
        || exit 1
    export PYTHONPATH="$work/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
failed=0
deadline=${DEADLINE:-520}
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, say how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    if [ $((SECONDS + limit)) -gt "$deadline" ]; then
        echo "=== $name: skipped (${SECONDS}s gone, limit ${limit}s, deadline ${deadline}s)"
        return
    fi
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    [ $rc -eq 0 ] || failed=1
}

if [ "$DS_ACCELERATOR" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    stage nccl_check 60 bash -c "python3 bench/nccl_check.py | tee '$out/nccl_check.json'"
fi
bench=(python3 bench/real_size.py --size "$size" --work_dir "$work" --steps ${STEPS:-4} --questions ${QUESTIONS:-64})
stage real_size 240 "${bench[@]}" --sections counts,step,tiles,scoring --out "$out/real_size.json"

# The paper's job on the checkpoint the benchmark built: an 8/4/8-image WBCAtt-format release
# at the real tile size, so that one epoch is a few steps and validation runs after it.
checkpoint=$(ls -d "$work"/mllama-* | head -n 1)
python3 - "$work" <<'EOF'
import sys
from pathlib import Path
from medift.datasets.synthetic import write_synthetic
from medift.prepare import ShardsConfig, prepare_shards
root = Path(sys.argv[1])
if not (root / "shards" / "manifest.json").is_file():
    write_synthetic("wbcatt", root / "raw", seed=3, n_train=8, n_val=4, n_test=8, image_size=560)
    prepare_shards(ShardsConfig(dataset="wbcatt", raw_dir=str(root / "raw"), out_dir=str(root / "shards"),
                                report=str(root / "report.json"), image_size=560, seed=3))
EOF
bf16=$([ "$DS_ACCELERATOR" = cuda ] && echo True || echo False)
stage train 170 bash -c "python3 -m medift.train --shards '$work/shards' --base_model '$checkpoint' --out_dir '$work/tuned' \
    --train_modules vision,fusion --bf16 $bf16 --batch_size 2 --global_batch 2 --gradient_checkpointing True --epochs 1 \
    --warmup_epochs 1 --lr 2e-5 --val_batch_size 8 --seed 1 > '$out/train.log' 2>&1; rc=\$?; \
    cp '$work/tuned/train_summary.json' '$out/' 2>/dev/null; tail -n 5 '$out/train.log'; exit \$rc"
dtype=$([ "$DS_ACCELERATOR" = cuda ] && echo bfloat16 || echo float32)
stage evaluate 70 bash -c "python3 -m medift.evaluate --model '$work/tuned' --shards '$work/shards' --split test \
    --scoring letter --circular False --dtype $dtype --device auto --out '$work/predictions.csv' --summary '$out/evaluate_metrics.json' \
    > '$work/evaluate.log' 2>&1; rc=\$?; tail -n 3 '$work/evaluate.log'; exit \$rc"
stage load_memory 60 "${bench[@]}" --sections load --ranks 1 --load_modes bf16_zero2 --out "$out/load_memory.json"
python3 - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("nccl_check.json", "real_size.json", "train_summary.json", "evaluate_metrics.json", "load_memory.json"):
    path = out / name
    if path.is_file():
        data = json.loads(path.read_text())
        data.pop("history", None)
        print(f"--- {name}\n{json.dumps(data)[:6000]}")
EOF
exit $failed
