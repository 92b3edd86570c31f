# The two commands of the README: `make demo` and `make test`. Both run `make setup` first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup demo test test-fast test-soak bench clean

setup: $(STAMP)

# Idempotent: the venv is rebuilt only when the packaging files change.
# torch is installed first, from the pin in constraints.txt (a CPU wheel), so that
# nothing later can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,dev]'
	@# headless Chromium for the HTML report test; best effort (the test skips, saying why, without it)
	@command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1)) ; } || \
	  echo "note: headless Chromium not installed; the HTML rendering test will be skipped"
	touch $(STAMP)

# Part 1, the headline job: the trained zoo DiT exported to ONNX, rewritten with crms,rettention,
# verified (dense step exactly, sparse schedule per step and by sampling against dense), timed;
# demo-report.html holds the dense / Re-ttention / naive sparse sample grids and the graph diff.
# Part 2: foldnorm on a conv + BatchNorm CNN through the CLI.
demo: setup
	$(PY) -m models_zoo.demo --out demo-out --html demo-report.html
	$(VENV)/bin/rewrite zoo:bn-cnn --passes foldnorm --bench --html demo-foldnorm.html -o demo-out/bn-cnn.foldnorm.onnx

test: setup
	$(PY) -m pytest -q tests

# The whole suite SOAK_RUNS times in a row from a fresh clone of HEAD, with every core kept
# busy by spinning processes; stops at the first failure (benchmarks/soak.py). Not run by CI.
SOAK_RUNS ?= 5
test-soak: setup
	$(PY) benchmarks/soak.py --runs $(SOAK_RUNS)

bench: setup
	$(PY) benchmarks/foldnorm_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
