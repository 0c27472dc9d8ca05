#!/usr/bin/env bash
# The main job: build cells/paragru.cell and show it working (sequential vs Newton, speed).
# Installs what it needs into ./.venv on first use.
source "$(dirname "$0")/_env.sh"
python examples/demo.py "$@"
