#!/usr/bin/env bash
# Set up fedpriv in a virtual environment (default ./.venv) with everything the app and tests need.
#
# PyTorch: if the environment already has a torch (e.g. a CUDA build a GPU user installed first),
# it is kept. Otherwise the CPU build torch==2.13.0 is installed *before* the project, so that the
# project's "torch>=2.2" never pulls a multi-GB CUDA build. Knobs:
#   FEDPRIV_VENV=path          virtual environment to create/use (default .venv)
#   FEDPRIV_TORCH_SPEC=spec    torch requirement to install when none is present (default torch==2.13.0)
#   FEDPRIV_TORCH_INDEX=url    index for that torch, e.g. https://download.pytorch.org/whl/cpu on machines
#                              whose pip has no local CPU wheel (plain PyPI serves CUDA builds on Linux)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FEDPRIV_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: keeping installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
else
  spec="${FEDPRIV_TORCH_SPEC:-torch==2.13.0}"
  echo "setup: installing $spec (CPU build)"
  if [ -n "${FEDPRIV_TORCH_INDEX:-}" ]; then
    "${pip[@]}" "$spec" --index-url "$FEDPRIV_TORCH_INDEX"
  else
    "${pip[@]}" "$spec"
  fi
fi

echo "setup: installing fedpriv and its test tools"
"${pip[@]}" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "setup: done ($("$venv/bin/python" -c 'import torch, flwr, opacus; print(f"torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}")'))"
