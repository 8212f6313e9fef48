#!/usr/bin/env bash
# The main command on its embedded default: tiny model, synthetic data, CPU.
# Until the trainer lands it runs the InfoTok regularizer on its synthetic bottleneck problem.
source "$(dirname "$0")/env.sh"
exec python -m pipeline.bottleneck_demo "$@"
