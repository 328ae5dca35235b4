# mriaudit: `make demo` and `make test` work on a fresh clone; each builds .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_INPUT := results/demo-input
DEMO_LABELS := results/demo-labels.tsv
DEMO_OUT := results/demo
DEMO_SUBJECTS ?= 30

.PHONY: venv demo test lint format bench bench-mriqc browser clean

venv: $(STAMP)

# Exact pins; torch==2.13.0 is the CPU build on these machines (an unpinned torch pulls CUDA).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The demo cohort is generated once; delete results/demo-input to regenerate it.
$(DEMO_LABELS): | $(STAMP)
	rm -rf $(DEMO_INPUT)
	$(BIN)/python -m mriaudit.demo $(DEMO_INPUT) --subjects $(DEMO_SUBJECTS) --labels $(DEMO_LABELS) --contrasts T2w FLAIR

demo: venv $(DEMO_LABELS)
	$(BIN)/snakemake --cores all --config input_dir=$(DEMO_INPUT) output_dir=$(DEMO_OUT) labels=$(DEMO_LABELS)
	@echo "report: $(abspath $(DEMO_OUT))/cohort/report.html"

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile rules/

# The report's browser test drives Chromium (Debian package); installed here as root on
# Debian, elsewhere the test skips and says why.
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && grep -q '^ID=debian' /etc/os-release 2>/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else echo "chromium missing and not root on Debian: the browser tests will skip"; fi

test: venv lint browser
	$(BIN)/python -m pytest -ra

# Per-stage cost of one 1 mm T1 and the cohort steps at 10,000 subjects (results/bench/bench.json),
# detection on the real-head cohort, per anomaly kind (results/bench/detection/detection-<method>.json),
# then every model.method on the real heads and the demo, one table (results/bench/methods/methods.json),
# then the T2w and FLAIR per anomaly kind on the real heads and against real lesions
# (results/bench/contrasts/contrasts.json).
bench: venv
	$(BIN)/python -m mriaudit.bench --out results/bench
	$(BIN)/python -m mriaudit.bench_detection --work results/bench/detection
	$(BIN)/python -m mriaudit.bench_methods --work results/bench/methods
	$(BIN)/python -m mriaudit.bench_contrasts --work results/bench/contrasts

# Rank agreement of the IQMs with MRIQC 24's own functions on a degraded real head
# (docs/MRIQC.md; about 20 min on 2 cores). MRIQC lives in its own venv, never in .venv:
# its functions need only numpy, scipy, statsmodels and nibabel beside it.
MRIQC_VENV := .venv-mriqc
$(MRIQC_VENV)/.installed:
	test -x $(MRIQC_VENV)/bin/python || $(PYTHON) -m venv $(MRIQC_VENV)
	$(MRIQC_VENV)/bin/python -m pip install --quiet --no-deps mriqc==24.0.2
	$(MRIQC_VENV)/bin/python -m pip install --quiet numpy==2.4.6 scipy==1.17.1 statsmodels==0.15.0 nibabel==5.4.2
	touch $@

bench-mriqc: venv $(MRIQC_VENV)/.installed
	$(BIN)/python -m mriaudit.bench_mriqc --work results/bench/mriqc --mriqc-python $(MRIQC_VENV)/bin/python

clean:
	rm -rf results .snakemake
