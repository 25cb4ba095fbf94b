#!/usr/bin/env bash
# The wheel check: build the wheel, install it with the [weights] extra into a fresh virtual
# environment outside the checkout, and run the getting-started page's Python example in an empty
# folder with that environment's python. It catches what an editable install hides: package data left
# out of the wheel (templates, presets), a dependency missing from install_requires, an example that
# no longer runs as written.
#
# Usage: .ci/wheel_check.sh [PAGE]   (PAGE: the Markdown page whose ```python blocks run; default
# docs/getting-started.md). Needs python3 with venv; HF_HUB_OFFLINE=1 is set here (no hub download).
set -euo pipefail
cd "$(dirname "$0")/.."
page="$(realpath -- "${1:-docs/getting-started.md}")"
[ -f "$page" ] || { echo "wheel check: $page not found" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "--- wheel check in $work"
rm -rf build  # setuptools packs a stale build/lib into the wheel: build from the sources only
pip wheel -q --no-deps . -w "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
wheel=("$work"/dist/multimodal_lesion-*.whl)
"$work/venv/bin/python" -m pip install -q "${wheel[0]}[weights]"

# Every ```python block of the page, in order, as one script.
python3 - "$page" "$work/example.py" <<'PY'
import re
import sys
from pathlib import Path

text = Path(sys.argv[1]).read_text(encoding="utf-8")
blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
if not blocks:
    sys.exit(f"wheel check: no ```python block in {sys.argv[1]}")
Path(sys.argv[2]).write_text("\n".join(blocks), encoding="utf-8")
PY

mkdir "$work/empty"
cd "$work/empty"
# outside the checkout, with nothing of it on the path: the installed wheel is what is imported
env -u PYTHONPATH HF_HUB_OFFLINE=1 MPLBACKEND=Agg "$work/venv/bin/python" "$work/example.py"
echo "--- wheel check: the getting-started example ran on the installed wheel"
