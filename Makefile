# `make demo` and `make test` install into .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean reference-model

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

# Regenerates eval/testbed/reference_model from scratch (train split only; 37-62 min on 2 CPU
# cores, by the machine's speed that day: the shipped model's run took 37.0 min, the same
# command on the previous counting grid 61.6 min on a slower day):
# stage 1 trains the vision tower on dense patch labels, stage 2 the projector and the LLM with
# the answer loss plus supervised attention (recipes/grounding.py), both in bf16 autocast.
reference-model: $(STAMP)
	$(PY) -m eval.testbed.data make --out data/testbed --train 48000 --validation 700 \
		--test 1400 --seed 0 --train-questions-per-image 16
	$(PY) -m recipes.train --data data/testbed --init-reference --model-size cpu-small-3 \
		--vision-pretrain-steps 1200 --vision-pretrain-batch-size 32 --vision-pretrain-lr 2e-3 \
		--freeze-vision --grounding-weight 1.0 --question-weight 1.0 --letter-weight 1.0 \
		--readout-weight 1.0 --evidence-weight 1.0 --count-weight 1.0 --option-weight 1.0 \
		--neighbour-weight 1.0 --coordinate-weight 1.0 --evidence-layer 1 --bf16 \
		--early-answer-weight 0.5 --force-option-head --option-letter-weight 1.0 \
		--family-weights counting=3,attribute=0.5,existence=0.5 \
		--max-steps 2200 --batch-size 16 --lr 1e-3 --warmup 50 \
		--save-steps 200 --logging-steps 25 --threads 2 --output-dir runs/reference \
		--final-dir eval/testbed/reference_model --eval-split validation \
		--tally-weight 1.0 --vision-tally-label --cache-vision-features

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
