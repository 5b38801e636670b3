# The README's two commands: `make demo` and `make test`. Each creates .venv when missing and
# installs the CPU build of torch 2.13.0 before the package (an unpinned torch would pull a
# multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,export]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/train_digits.py

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_quantizers.py

clean:
	rm -rf $(VENV) build dist *.egg-info
