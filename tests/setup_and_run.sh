#!/usr/bin/env bash
# Sets up this checkout for the whole test suite and runs it: `bash tests/setup_and_run.sh [pytest args]`.
#
# Installs, with this Python's pip: the CPU build of PyTorch (`torch==2.13.0` from PyPI), vlm_jax itself
# (editable) with its test and interop extras (pytest, transformers, safetensors), then timm and open_flamingo
# WITHOUT their dependencies (they would pull torchvision and open_clip, which the parity tests do not need);
# as root with apt-get available, Chromium for tests/test_report.py's screenshot (without it that test is
# skipped, saying so). Then runs pytest on 8 emulated CPU devices (tests/conftest.py sets XLA_FLAGS),
# listing the slowest tests. `.ci/run` runs exactly this command.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,interop]"
python -m pip install -q --no-deps timm==1.0.31 open-flamingo==2.0.1 einops-exts==0.0.4
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "+ installing chromium (apt) for tests/test_report.py"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "+ no chromium and no root apt-get: tests/test_report.py's screenshot test will be skipped"
    fi
fi
python -m pytest -q --durations=20 tests "$@"
