# `make test` builds .venv at the repo root from the pinned lock file, then runs the CPU test suite.
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

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
