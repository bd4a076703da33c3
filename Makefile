# gmwae-studies: set-up, demo, tests and benchmarks.
#   make study       set up .venv, then run studies/quickstart.yaml (MNIST, both families, ~15 min)
#   make demo        set up .venv, then train a GM-WAE on scikit-learn's digits (offline, ~75 s)
#   make test        set up .venv, then run the test suite
#   make quality     benchmarks/quality.py on MNIST (2 x 20 min on 2 cores)
#   make throughput  benchmarks/throughput.py
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(if $(GMWAE_DATA_DIR),$(GMWAE_DATA_DIR),../shared/data/mnist)
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv study demo test quality throughput clean

# pip, not uv: torch==2.14.1 and torchvision==0.29.1 come from this machine's disk.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

study: venv
	GMWAE_DATA_DIR=$(DATA_DIR) $(VENV)/bin/gmwae study run studies/quickstart.yaml
	@echo "Open the study in MLflow:  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/quickstart/mlflow.db"

demo: venv
	$(VENV)/bin/gmwae train --family gmwae --preset cpu --dataset digits --epochs 30 --out runs/demo-digits-gmwae

test: venv
	$(PY) -m pytest -q

quality: venv
	$(PY) benchmarks/quality.py --data-dir $(DATA_DIR) --minutes 20 --out benchmarks/results/quality.json

throughput: venv
	$(PY) benchmarks/throughput.py --out benchmarks/results/throughput.json

clean:
	rm -rf runs/ .pytest_cache
