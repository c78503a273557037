# make demo : create .venv, install, run the tiny profile's graph (real Ray Serve, HTTP): a video
#             job from a generated portrait (out/demo.mp4), then an avatar from it and a lip-synced
#             talk turn from generated speech-like audio (out/demo-talk.mp4); shut down.
# make test : create/reuse .venv, install with test extras, run every test (what CI runs).
# make test-fast : the same, without the tests marked cluster (Ray), browser or slow: the lane to
#             run on every change (a few minutes on two cores; markers in pyproject.toml).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# No GPU here: the CPU build of torch (2.13.0 is on this machine's disk). With a GPU, pip's
# default torch wheel (CUDA). Override with `make TORCH_SPEC=...`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")
# With a GPU also cuDNN's FP8 attention (the fp8 profiles' `attention_backend: cudnn_fp8`); it
# brings NVIDIA's CUTLASS DSL (~490 MB), unused on CPUs.
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "test,fp8-attention" || echo "test")
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# Test-only: the reference the FAN and S3FD ports are compared with. --no-deps: the tests load
	# only its torch modules, so neither its OpenCV / numba / scipy / scikit-image (~180 MB) nor a
	# different torch come in (tests/models/test_face_alignment_reference.py).
	$(BIN)/python -m pip install -q --no-deps "face-alignment==1.5.0"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/avatar-serve demo --profile tiny -o out/demo.mp4

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not cluster and not browser and not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/stages.py --profile tiny

clean:
	rm -rf $(VENV) out .pytest_cache
