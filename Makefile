# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and install blip2rt with the pinned CPU constraints.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/blip2rt demo

test: $(STAMP)
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
