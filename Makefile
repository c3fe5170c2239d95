# `make test` and `make demo` build .venv from requirements.txt alone, so a clean clone works.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CONF := conf_demo.yaml

.PHONY: venv test demo bench clean-demo

venv: $(VENV)/.installed

# The project itself is installed editable so that `python preprocessing/01_....py` imports
# `utils` and `models` from any directory, without path hacks in the scripts.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest -q

# The whole pipeline offline on a generated dataset in the Clotho layout (see README).
demo: venv
	$(PY) preprocessing/00_make_demo_dataset.py --conf $(DEMO_CONF)
	PYTHON=$(PY) ./run.sh --conf $(DEMO_CONF) --stage 1 --stop-stage 7

bench: venv
	$(PY) benchmarks/bench_preprocessing.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_postprocessing.py --clips 1045 --captions-per-clip 5

clean-demo:
	rm -rf data/demo outputs/demo
