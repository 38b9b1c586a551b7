#!/usr/bin/env bash
# Multi-host launch examples for jobs/train.py (Horovod over Gloo; use --mpi with an MPI build).
#
# Prerequisites on every host: the same checkout at the same path, the project venv
# (make setup), password-less ssh from the launching host, and the data at the same path
# (checkpoints and --resume need a folder every rank can read, e.g. a shared filesystem).
#
# Usage: HOSTS="host1:2,host2:2" bash jobs/examples/multi_host.sh [extra train.py flags]
set -euo pipefail

cd "$(dirname "$0")/../.."
HOSTS="${HOSTS:-host1:2,host2:2}"          # host:slots, one slot per rank (per GPU or per socket)
NP="${NP:-$(echo "$HOSTS" | tr ',' '\n' | awk -F: '{s += $2} END {print s}')}"
PY="${PY:-$PWD/.venv/bin/python}"
HVDRUN="${HVDRUN:-$PWD/.venv/bin/horovodrun}"
# Pin the network interface Gloo uses when hosts have several (e.g. NIC=eth0).
IFACE_FLAGS=()
if [[ -n "${NIC:-}" ]]; then IFACE_FLAGS=(--network-interface "$NIC"); fi

# 1. DHO2 on the MNIST-1D MLP (no data to copy: generated on every rank with a fixed seed).
"$HVDRUN" --gloo -np "$NP" -H "$HOSTS" "${IFACE_FLAGS[@]}" \
    "$PY" jobs/train.py --model mlp --dataset mnist1d --optimizer dho2 --base momentum \
    --learning-rate 0.1 --alpha 0.01 --refresh-every 200 --warmup 40 --schedule cosine \
    --epochs 60 --batch-size 50 --verbose 2 "$@"

# 2. The CIFAR-10 ResNet-110 recipe of the paper (needs the CIFAR-10 python batches in
#    $DATA_DIR on every host; see jobs/examples/README.md).
if [[ -n "${DATA_DIR:-}" ]]; then
    "$HVDRUN" --gloo -np "$NP" -H "$HOSTS" "${IFACE_FLAGS[@]}" \
        "$PY" jobs/train.py --config jobs/configs/cifar10_resnet110_dho2.yaml \
        --data-dir "$DATA_DIR" "$@"
fi
