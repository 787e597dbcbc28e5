#!/bin/sh
# The GPU smoke test: run once on a real GPU host, from the repository, after
# `make .venv/.installed-stamp` (or inside the trainer's image, with its python).
# One-GPU and all-GPU mirrored jobs, with and without XLA, in float32 and
# bfloat16; checks NCCL, where the data and the step's ops live, and the GPU
# memory metrics; prints each job's throughput. Exit 0 when every check passed.
#
#   deploy/gpu-smoke.sh [--dataset mnist|synthetic] [--epochs 1] [--state-dir DIR] [--plan]
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m service.cli.gpu_smoke "$@"
