#!/usr/bin/env bash
# edgepack: one-command set-up, then the demo or the test suite.
#
#   bash run.sh demo   # set up, build the sample model's bundle for this host, install it, stream an answer
#   bash run.sh test   # set up, then lint and run the whole test suite (what CI runs)
#   bash run.sh setup  # set up only
#
# Set-up is idempotent and safe to re-run: it installs missing Debian packages (as root), creates
# .venv, and installs edgepack with its extras. torch is pinned in the same pip command as everything
# that depends on it, so pip never resolves a CUDA build. llama-cpp-python is compiled once (about
# 10 minutes on 2 cores) for a portable x86-64-v3 / armv8 baseline rather than this exact CPU, so the
# wheel pip caches (and any frozen binary) runs on other machines of the same architecture.
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${EDGEPACK_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
export EDGEPACK_CACHE=${EDGEPACK_CACHE:-$HOME/.cache/edgepack}
# Portable llama.cpp build: no -march=native, no BLAS, no curl (the agent never downloads models itself).
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_setup() {
    local need=()
    command -v apt-get >/dev/null 2>&1 || return 0
    # mosquitto: the broker the demo and the tests start; systemd: systemd-analyze, which the
    # tests use to verify the agent's unit (systemd need not be PID 1 for that); chromium: the
    # headless browser the fleet console's tests render the page in.
    for pkg in python3-venv python3-dev build-essential cmake git mosquitto systemd chromium; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    # pyenv/other Pythons ship venv and headers themselves; only Debian's python3 needs the packages.
    if [ ${#need[@]} -eq 0 ]; then return 0; fi
    if [ "$(id -u)" -ne 0 ]; then
        say "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})"
        return 0
    fi
    say "installing Debian packages: ${need[*]}"
    apt-get update -qq || say "apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null ||
        say "could not install ${need[*]}; continuing (the steps that need them will say so)"
}

venv_setup() {
    local stamp="$VENV/.edgepack-installed"
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local base=${PYTHON:-python3}
    if ! "$base" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
        say "Python 3.11+ is required (found: $($base --version 2>&1))"
        exit 1
    fi
    [ -x "$PY" ] || { say "creating $VENV"; "$base" -m venv "$VENV"; }
    say "installing edgepack and its tools into $VENV (first time: ~10-15 minutes)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==2.13.0" -e ".[llamacpp,ortgenai,openvino,packager,dev]"
    echo "$want" >"$stamp"
}

setup() {
    apt_setup
    venv_setup
}

case "${1:-}" in
    setup)
        setup
        ;;
    demo)
        shift
        setup
        exec "$VENV/bin/edgepack" demo "$@"
        ;;
    test)
        shift
        setup
        say "ruff"
        "$VENV/bin/ruff" check agent packager fleet edgepack tests bench
        say "mypy"
        "$VENV/bin/mypy" agent packager fleet edgepack
        say "pytest"
        exec "$PY" -m pytest "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test|setup" >&2
        exit 2
        ;;
esac
