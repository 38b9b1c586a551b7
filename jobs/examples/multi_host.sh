#!/usr/bin/env bash
# Multi-host launch examples for jobs/train.py (Horovod over Gloo; use --mpi with an MPI build).
#
# Prerequisites on every host: the same checkout at the same path, the project venv
# (make setup), the data at the same path, password-less ssh from the launching host (as the
# same user), and a host name that resolves, on that host, to its address on the network the
# ranks talk over (Gloo's process-set connections use that address). Checkpoints and --resume
# need a folder every rank can read, e.g. a shared filesystem (see jobs/examples/README.md).
#
# Usage: HOSTS="host1:2,host2:2" bash jobs/examples/multi_host.sh [extra train.py flags]
#   HOSTS          host:slots list, one slot per rank (per GPU or per socket)
#   NP             number of ranks (default: the sum of the slots)
#   NIC            network interface Gloo uses when hosts have several (e.g. NIC=eth0); every
#                  host and the launching host must have an interface of that name
#   SSH_PORT, SSH_IDENTITY_FILE   ssh port and private key for the hosts (default: ssh's own)
#   PY, HVDRUN     the venv's python and horovodrun (default: .venv of this checkout)
#   DATA_DIR       also run the CIFAR-10 ResNet-110 recipe with the data in this folder
# Extra flags go to every train.py run and override the example's (e.g. --epochs 2).
set -euo pipefail

cd "$(dirname "$0")/../.."
HOSTS="${HOSTS:-host1:2,host2:2}"
NP="${NP:-$(echo "$HOSTS" | tr ',' '\n' | awk -F: '{s += $2} END {print s}')}"
PY="${PY:-$PWD/.venv/bin/python}"
HVDRUN="${HVDRUN:-$PWD/.venv/bin/horovodrun}"
for exe in "$PY" "$HVDRUN"; do
    if [[ ! -x "$exe" ]]; then
        echo "multi_host.sh: $exe not found: run 'make setup' or set PY and HVDRUN" >&2
        exit 2
    fi
done
LAUNCH=(--gloo -np "$NP" -H "$HOSTS")
if [[ -n "${NIC:-}" ]]; then LAUNCH+=(--network-interface "$NIC"); fi
if [[ -n "${SSH_PORT:-}" ]]; then LAUNCH+=(--ssh-port "$SSH_PORT"); fi
if [[ -n "${SSH_IDENTITY_FILE:-}" ]]; then LAUNCH+=(--ssh-identity-file "$SSH_IDENTITY_FILE"); fi

# 1. DHO2 on the MNIST-1D MLP (no data to copy: generated on every rank with a fixed seed).
"$HVDRUN" "${LAUNCH[@]}" \
    "$PY" jobs/train.py --model mlp --dataset mnist1d --optimizer dho2 --base momentum \
    --learning-rate 0.1 --alpha 0.01 --refresh-every 200 --warmup 40 --schedule cosine \
    --epochs 60 --batch-size 50 --verbose 2 "$@"

# 2. The CIFAR-10 ResNet-110 recipe of the paper (needs the CIFAR-10 python batches in
#    $DATA_DIR on every host; see jobs/examples/README.md).
if [[ -n "${DATA_DIR:-}" ]]; then
    "$HVDRUN" "${LAUNCH[@]}" \
        "$PY" jobs/train.py --config jobs/configs/cifar10_resnet110_dho2.yaml \
        --data-dir "$DATA_DIR" "$@"
fi
