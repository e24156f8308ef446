# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo demo-data test test-fast clean

setup:
	bash infra/setup.sh

demo-data: setup
	$(PY) jobs/prepare_vader.py --out data/vader --sources tweets,amazon --fractions train=0.25,validation=0.08,test=0.12

demo: demo-data
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} .venv/bin/kd-ray run --config jobs/configs/pipeline-demo.yaml

# Every test; --durations: each run (CI's too) lists its slowest tests, to keep the suite's budget in sight.
test: setup
	$(PY) -m pytest -q --durations=30

# The edit-test loop: no Ray, no training (the slow, cluster and fault tiers left out); about a minute.
test-fast: setup
	$(PY) -m pytest -q --durations=10 -m "not slow and not cluster and not fault"

clean:
	rm -rf runs
