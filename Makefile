# The two commands of the README: `make demo` (set up, then run the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo demo-data test test-fast docs clean

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

# The documentation site: the docs extra, then a strict build (a page left out of nav, a broken link or anchor
# fails it) into runs/site. NO_MKDOCS_2_WARNING: mkdocs-material's notice about its successor, not a build warning.
docs: setup
	$(PY) -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir runs/site

clean:
	rm -rf runs
