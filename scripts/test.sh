#!/usr/bin/env bash
# The test command: set up the environment, then run the whole suite (CPU, no network).
source "$(dirname "$0")/env.sh"
exec python -m pytest tests "$@"
