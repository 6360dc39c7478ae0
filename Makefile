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
	$(VENV)/bin/sift-compare $(SWEEP)

# one thread per test worker: two workers already fill two cores, and oversubscribed OpenMP threads spin
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# make bench [QUICK=1]: SIFT's step cost against its FLOP floor, vanilla against a hand-written loop
# (benchmarks/results/step_cost[-quick].md; about 15 min on 2 CPU cores, QUICK=1 under 3 min).
# Passive OpenMP threads unless set: on a shared, oversubscribed CPU spinning threads cost up to 10x.
bench: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/step_cost.py $(if $(QUICK),--quick)

# make bench-tta [QUICK=1]: time to accuracy of vanilla, SIFT, random and exact selection through the
# real CLI (benchmarks/results/time_to_accuracy[-quick].md; about 45 min on 2 CPU cores)
bench-tta: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/time_to_accuracy.py $(if $(QUICK),--quick)
