# make run: environment + install + a first comparison (SIFT, the random control and vanilla, one seed each,
# offline, about 2 min on 2 CPU cores after the install; passive OpenMP threads, as the benchmarks, since
# spinning ones cost up to 10x on a shared CPU): it shows the tool working, not a result
# make test: environment + install + the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP := outputs/multirun/make-run-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test bench bench-tta bench-gsgd bench-calibration clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/sift-train --multirun arm=sift,random,vanilla \
		trainer.max_time_s=35 trainer.eval_every_s=5 hydra.sweep.dir=$(SWEEP)
	$(VENV)/bin/sift-compare $(SWEEP)
	@echo
	@echo "What this shows: each arm trained 35 s once, the tool end to end, on the first plateau. With one seed"
	@echo "per arm there is no spread, so the table is not evidence that SIFT is faster or slower. A comparison"
	@echo "needs several seeds on a budget that leaves the plateau without reading the data many times over:"
	@echo "  $(VENV)/bin/sift-train --multirun seed=1,2,3 arm=vanilla,random,sift experiment=tta_bert_mini"
	@echo "about 2 h on 2 idle CPU cores (BERT-Mini, 720 s a run; seed first interleaves the arms), as measured in"
	@echo "benchmarks/results/time_to_accuracy-bert_mini-720.md; then sift-compare the sweep folder."

# one thread per test worker: two workers already fill two cores, and oversubscribed OpenMP threads spin
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# make bench [QUICK=1]: SIFT's step cost against its FLOP floor, vanilla against a hand-written loop
# (benchmarks/results/step_cost.md, about 15 min on 2 CPU cores; QUICK=1 checks the plumbing in 2 to 7 min,
# with the load, into outputs/benchmarks/step_cost-quick.md, leaving the tracked reports alone).
# Passive OpenMP threads unless set: on a shared, oversubscribed CPU spinning threads cost up to 10x.
bench: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/step_cost.py $(if $(QUICK),--quick)

# make bench-gsgd [QUICK=1]: GSGD against SGD on least squares and logistic regression with exact F*, the convex
# check of SIFT's theory (benchmarks/results/gsgd_convex.md and its plots, about 3 min on 2 CPU cores; QUICK=1:
# outputs/benchmarks/gsgd_convex-quick.md)
bench-gsgd: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/gsgd_convex.py $(if $(QUICK),--quick)

# make bench-calibration [QUICK=1]: known-answer calibration (duplicates, noise) of 7 arms on BERT-Tiny and
# ResNet-18, 3 seeds (benchmarks/results/calibration.md, about 50 min on 2 shared CPU cores; QUICK=1, about 8 min,
# checks the plumbing into outputs/benchmarks/calibration-quick.md and determines no verdict)
bench-calibration: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/calibration.py $(if $(QUICK),--quick)

# make bench-tta [QUICK=1]: time to accuracy of vanilla, SIFT, random and exact selection through the
# real CLI (benchmarks/results/time_to_accuracy.md, about 45 min on 2 CPU cores; QUICK=1:
# outputs/benchmarks/time_to_accuracy-quick.md)
bench-tta: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) benchmarks/time_to_accuracy.py $(if $(QUICK),--quick)
