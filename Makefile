# dho2_tf: `make demo` sets up a fresh machine and runs the demo; `make test` runs the test suite.
# Both reuse an existing .venv (scripts/setup_env.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
HVDRUN := $(VENV)/bin/horovodrun
NP ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup setup-test demo test test-slow test-fast

setup:
	bash scripts/setup_env.sh

# The test set-up: the pinned stack plus the Ray launcher's extra (`pip install .[ray]`) and
# the test extra (pytest, ruff).
setup-test:
	bash scripts/setup_env.sh ray test

# DHO2 on the MNIST-1D MLP (4000/1000 split, generated locally) over NP Gloo ranks, heavy-ball
# base at the learning rate tuned for it (flags beyond DHO2's defaults are given explicitly).
# A 0.1 ms Horovod cycle suits DHO2's dependent small collectives (see docs/performance.md).
demo: setup
	HOROVOD_CYCLE_TIME=$${HOROVOD_CYCLE_TIME:-0.1} $(HVDRUN) --gloo -np $(NP) -H localhost:$(NP) $(PY) jobs/train.py \
		--model mlp --dataset mnist1d --optimizer dho2 --base momentum --learning-rate 0.1 \
		--alpha 0.01 --refresh-every 200 --warmup 40 \
		--schedule cosine --epochs 60 --batch-size 50 --weight-decay 3e-4 --verbose 2

# The suite: ruff, then the single-process tests on two pytest-xdist workers (a test file's tests
# on one worker, so its module-scoped fixtures are built once), then, one at a time, the
# multi-process tests that launch real horovodrun (one launch per world size per test module
# where the checks allow) or Ray; without the long scenarios marked `slow`. The second part runs
# even when the first fails; the target fails if either did.
test: setup-test
	$(PY) -m ruff check dho2_tf jobs tests benchmarks
	$(PY) -m pytest -q --durations=15 -n 2 --dist loadfile -m "not parallel and not slow" tests; \
	single=$$?; \
	$(PY) -m pytest -q --durations=25 -m "parallel and not slow" tests; \
	multi=$$?; \
	test $$single -eq 0 && test $$multi -eq 0

# The long multi-process scenarios (marked `slow`): elastic and Ray recovery from kill -9 of
# rank 0, a worker killed or added, a lost host, checkpoints across 1 and 3 ranks, every mode at
# P = 4 and on MNIST-1D, the quick scaling and time-to-target benchmarks, jobs over two simulated
# hosts (tests/jobs/multihost: network namespaces with sshd, needs root). CI runs them too.
test-slow: setup-test
	$(PY) -m pytest -q --durations=25 -m slow tests

# Single-process tests only.
test-fast: setup
	$(PY) -m pytest -q -m "not parallel and not slow" tests
