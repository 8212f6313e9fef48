#!/usr/bin/env bash
# The main job on its embedded default: synthetic data -> shards -> tiny Show-o2 with InfoTok on
# 2 CPU ranks under DeepSpeed -> stop with a signal -> resume -> export -> summary.
source "$(dirname "$0")/env.sh"
exec python -m pipeline.demo "$@"
