#!/usr/bin/env bash
# Install microadam into ./.venv with what the built-in tasks need (and, with --test, what the
# tests need), plus the Debian data packages of the fashion, charlm and fortunes tasks.
#   bash setup.sh          # main job: microadam compare
#   bash setup.sh --test   # + peers, integrations, test tools
set -euo pipefail
cd "$(dirname "$0")"
extras="tasks"
[ "${1:-}" = "--test" ] && extras="test"
python3 -m venv .venv
# torch 2.13.0 unless .venv already has a torch (any >= 2.4 works): to use a GPU, create .venv and
# install your CUDA build of torch into it first. (On this project's machines pip serves a CPU wheel
# of 2.13.0; plain PyPI on Linux serves a CUDA build.)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[$extras]"
if command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist bible-kjv fortunes; } >/dev/null; then
    echo "setup.sh: could not install dataset-fashion-mnist, bible-kjv and fortunes; the fashion, charlm and fortunes tasks need them" >&2
  fi
fi
