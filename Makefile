# make run: environment + install + the default experiment (SIFT and vanilla, offline, ~3 min on 2 CPU cores)
# make test: environment + install + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP := outputs/multirun/make-run-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test bench bench-tta clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/sift-train --multirun frac=0.5,1.0 hydra.sweep.dir=$(SWEEP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
