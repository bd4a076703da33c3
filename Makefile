# gmwae-studies: set-up, demo, tests and benchmarks.
#   make study       set up .venv, then run studies/quickstart.yaml (MNIST, both families, local Ray, sqlite stores)
#   make demo        set up .venv, then train a GM-WAE on scikit-learn's digits (offline)
#   make test        set up .venv and the system packages (apt: chromium, postgresql), run the tests
#   make test-quick  the same without the `slow` tests (the local multi-node clusters)
#   make quality     benchmarks/quality.py on MNIST: 5 variants x 3 seeds x 20 min
#   make throughput  benchmarks/throughput.py
#   make results     docs/results.md, the README's results table and the decisions' evidence, from benchmarks/results/
#   make docs        docs/spec.md and docs/config.md from the code's docstrings, then make results
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(if $(GMWAE_DATA_DIR),$(GMWAE_DATA_DIR),../shared/data/mnist)
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv sysdeps study demo test test-quick quality throughput results docs clean

# pip, not uv: torch==2.14.1 and torchvision==0.29.1 come from this machine's disk.
# The venv also gets cluster/node_setup.sh's marker (the hash of this folder and
# pyproject.toml): the on-prem loopback cluster's nodes run from it, and the shipped setup
# then installs nothing into it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.deps-*
	touch $(VENV)/.deps-$$( { printf '%s\n' "$(CURDIR)"; cat pyproject.toml; } | sha256sum | cut -c1-12)
	touch $@

venv: $(VENV)/.installed

# System packages the tests use: Debian's chromium (the dashboard is checked in it),
# PostgreSQL (the local cluster's Optuna storage), sudo (the shipped head setup runs
# PostgreSQL as its user), OpenSSH's server and rsync (`ray up` of
# the on-prem form over SSH on loopback addresses). Installed with apt when missing.
sysdeps:
	@missing=""; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	test -x /usr/bin/sudo || missing="$$missing sudo"; \
	command -v rsync >/dev/null || missing="$$missing rsync"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

study: venv
	GMWAE_DATA_DIR=$(DATA_DIR) $(VENV)/bin/gmwae study run studies/quickstart.yaml
	@echo "Open the study in MLflow:  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///runs/quickstart/mlflow.db"

demo: venv
	$(VENV)/bin/gmwae train --family gmwae --preset cpu --dataset digits --epochs 30 --out runs/demo-digits-gmwae

# Two pytest-xdist workers, a file's tests on one (TEST_WORKERS=0: one process, in file order);
# tests/conftest.py runs the multi-node clusters one at a time.
TEST_WORKERS ?= 2
PYTEST := PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: venv sysdeps
	$(PYTEST) --durations=30

test-quick: venv sysdeps
	$(PYTEST) -m "not slow"

quality: venv
	$(PY) benchmarks/quality.py --data-dir $(DATA_DIR) --minutes 20 --seeds 3 \
	    --variants paper,consistency-tuned,warm-start,gmvae,gmvae-consistency-tuned --out benchmarks/results/quality/seeds.json

throughput: venv
	$(PY) benchmarks/throughput.py --out benchmarks/results/throughput/cpu.json

results: venv
	$(PY) benchmarks/report.py

docs: venv
	$(PY) docs/reference.py
	$(PY) benchmarks/report.py

clean:
	rm -rf runs/ .pytest_cache
