# mnemax: `make demo` and `make test` each set up everything on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell .ci/find-python)
STAMP := $(VENV)/.installed
FIG_OUT ?= figures
SEED ?= 0
# make test's pytest workers (pytest-xdist), each taking a test module at a time
TEST_WORKERS ?= 2

.PHONY: demo test figures bench venv lock clean

# mnemax and its test extra at the exact versions the tests passed with (constraints.txt).
# pip compiles the packages' bytecode one file at a time; compileall does it on every core
# (a fresh venv in 32 s instead of 45 s on 2 cores). A file that does not compile is skipped,
# as pip skips it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	  > /dev/null || echo "compileall: some installed files did not compile (pip skips them too)"
	@touch $(STAMP)

venv: $(STAMP)

# Re-pins constraints.txt from a fresh venv installed without it; then make test, raise bounds.
LOCK_VENV := $(VENV)-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]'
	{ grep '^#' constraints.txt; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --exclude mnemax; } > constraints.new
	mv constraints.new constraints.txt && rm -rf $(LOCK_VENV)

# The figures at --size quick (all but those registered out of the demo), written to $(FIG_OUT)/;
# their numbers with provenance also to $(FIG_OUT)/results/NAME-quick-seed$(SEED).json (the files
# `python -m eval.report` reads once copied to results/figures/). Time: README, "The demo".
demo: $(STAMP)
	$(PY) -m eval.figures --size quick --seed $(SEED) --out $(FIG_OUT) --results $(FIG_OUT)/results

# The test suite (8 fake CPU devices set in tests/conftest.py) with JAX's persistent compilation
# cache on, so a rerun skips compilation; .ci/run calls this target. JAX_COMPILATION_CACHE_DIR
# overrides where the cache lives.
test: $(STAMP)
	export JAX_COMPILATION_CACHE_DIR="$${JAX_COMPILATION_CACHE_DIR:-$$HOME/.cache/mnemax/jax-cache}" \
	  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 && \
	mkdir -p "$$JAX_COMPILATION_CACHE_DIR" && \
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

# The figures at --size cpu (roughly 1.5 hours on 2 CPU cores; each result file's provenance holds
# its figure's seconds); the numbers with their provenance
# also go to results/figures/NAME-cpu-seed$(SEED).json, the files `python -m eval.report` reads.
figures: $(STAMP)
	$(PY) -m eval.figures --size cpu --seed $(SEED) --out $(FIG_OUT) --results results/figures

bench: $(STAMP)
	$(PY) -m benchmarks.trainer

clean:
	rm -rf $(VENV) .pytest_cache
