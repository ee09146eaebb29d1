#!/usr/bin/env bash
# Refresh constraints.txt, the package versions the setup command installs (and CI tests with).
#
# Installs the newest releases that pyproject.toml admits into a fresh virtualenv, runs the whole test suite
# against them, and rewrites constraints.txt only if it passes. torch and the packages it brings are not
# pinned: the setup command must keep a PyTorch that is already installed, with its own dependencies.
#
#   bash scripts/update-constraints.sh            # then review `git diff constraints.txt` and commit it
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip freeze > "$work/torch.txt"
"$py" -m pip install -q -e ".[dev,llamacpp]"   # llamacpp: pinned too (it compiles llama.cpp: minutes of CPU)
"$py" -m pytest tests -q -p no:cacheprovider
"$py" - "$work/torch.txt" > "$work/constraints.txt" <<'PY'
import re
import subprocess
import sys

def name(line):
    return re.split(r"[=@ ]", line, maxsplit=1)[0].strip().lower().replace("_", "-")

with_torch = {name(line) for line in open(sys.argv[1]) if line.strip()}
frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                        text=True, check=True).stdout.splitlines()
print("# The versions the test suite passed with, used by the setup command (pip install -c constraints.txt).")
print("# Regenerate with `bash scripts/update-constraints.sh`; torch and its own dependencies are left free.")
for line in sorted(frozen, key=name):
    if "==" in line and name(line) not in with_torch:
        print(line)
PY
mv "$work/constraints.txt" constraints.txt
echo "constraints.txt updated: $(grep -c '==' constraints.txt) packages pinned"
