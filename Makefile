# `make demo` captions the shipped example with the built-in model; `make test` runs the CPU test suite.
# Both build .venv at the repo root from the pinned lock file first.
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements/lock.txt

.PHONY: test demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
