#!/usr/bin/env bash
# Recovery fine-tuning of a CrossGET LLaVA (recipes/llava_finetune.py) under `accelerate launch`.
#
#   DATA=data/llava_v1_5_mix665k.json IMAGE_FOLDER=data/images BUDGET=144 \
#       recipes/llava_finetune.sh --bf16 --gradient-checkpointing
#
# Environment variables it reads (all optional except DATA):
#   BASE_MODEL         base LLaVA, hub name or local folder   (default: llava-hf/llava-1.5-7b-hf)
#   DATA               LLaVA JSON/JSONL file, `datasets` save_to_disk folder or testbed
#                      export root                                                (required)
#   IMAGE_FOLDER       folder the JSON's image names are relative to  (default: JSON's images/)
#   BUDGET             visual tokens per image (--visual-tokens); empty = pass your own budget
#                      flag (--keep-ratio / --r / --crossget-config) in the arguments (default: 144)
#   OUTPUT_DIR         run folder (adapter/, crossget/, loss.json, ...)  (default: runs/llava-ft-BUDGET)
#   NUM_PROCESSES      processes = GPUs (or CPU workers)  (default: number of visible GPUs, min 1)
#   ACCELERATE_CONFIG  accelerate config file  (default: recipes/accelerate/single_gpu.yaml for
#                      one process, recipes/accelerate/multi_gpu_ddp.yaml for more)
#   LAUNCHER           accelerate | torchrun  (default: accelerate)
#   MAIN_PROCESS_PORT  rendezvous port of a multi-process run  (default: the launcher's, 29500;
#                      accelerate only — torchrun --standalone picks a free one)
#   PYTHON             interpreter with the project installed  (default: the checkout's
#                      .venv/bin/python when it exists, else python)
# It sets no environment variables itself. Every argument ("$@") goes to recipes.llava_finetune
# (see `python -m recipes.llava_finetune --help`), e.g. --bf16, --qlora, --resume, --max-steps N.
#
# CPU-only machines: `accelerate launch --cpu --num_processes N` starts a single process
# (accelerate spawns CPU workers only through mpirun). The DDP config (multi_gpu_ddp.yaml) does
# spawn N workers without GPUs, and the recipe then trains with gloo (it sets the Trainer's
# use_cpu when torch sees no CUDA); LAUNCHER=torchrun runs `torchrun --standalone
# --nproc_per_node N` instead, which does the same with less start-up time.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# The interpreter must have the project's dependencies (a bare ModuleNotFoundError says little).
python_ok() {
    "$PYTHON" -c 'import torch, transformers, peft, accelerate' >/dev/null 2>&1
}
python_hint() {
    echo "error: PYTHON=$PYTHON cannot import torch/transformers/peft/accelerate; point PYTHON" \
        "at the environment with the project installed (PYTHON=.venv/bin/python after" \
        "\`make install\`), or install it into this one: pip install -e ." >&2
}

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        # The comment block at the top of this file, then the recipe's own flags.
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo
        if python_ok; then
            exec "$PYTHON" -m recipes.llava_finetune --help
        fi
        python_hint
        echo "(the recipe's flags: \`python -m recipes.llava_finetune --help\`)" >&2
        exit 0
    fi
done
BASE_MODEL=${BASE_MODEL:-llava-hf/llava-1.5-7b-hf}
BUDGET=${BUDGET-144}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llava-ft-${BUDGET:-custom}}
LAUNCHER=${LAUNCHER:-accelerate}
if ! python_ok; then
    python_hint
    exit 2
fi
if [[ -z "${DATA:-}" ]]; then
    echo "error: set DATA to a LLaVA JSON/JSONL file, a datasets folder or a testbed export" >&2
    exit 2
fi
if [[ -z "${NUM_PROCESSES:-}" ]]; then
    NUM_PROCESSES=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
    if (( NUM_PROCESSES > 1 )); then
        ACCELERATE_CONFIG=recipes/accelerate/multi_gpu_ddp.yaml
    else
        ACCELERATE_CONFIG=recipes/accelerate/single_gpu.yaml
    fi
fi

args=(--model "$BASE_MODEL" --data "$DATA" --output-dir "$OUTPUT_DIR")
if [[ -n "${IMAGE_FOLDER:-}" ]]; then
    args+=(--image-folder "$IMAGE_FOLDER")
fi
if [[ -n "$BUDGET" ]]; then
    args+=(--visual-tokens "$BUDGET")
fi

case "$LAUNCHER" in
    accelerate)
        launch=(--config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES")
        if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then
            launch+=(--main_process_port "$MAIN_PROCESS_PORT")
        fi
        exec "$PYTHON" -m accelerate.commands.launch "${launch[@]}" \
            -m recipes.llava_finetune "${args[@]}" "$@"
        ;;
    torchrun)
        exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NUM_PROCESSES" \
            -m recipes.llava_finetune "${args[@]}" "$@"
        ;;
    *)
        echo "error: LAUNCHER must be accelerate or torchrun, got '$LAUNCHER'" >&2
        exit 2
        ;;
esac
