#!/usr/bin/env bash
# Writes deploy/constraints.txt: every package `pip install '.[server]'` installs,
# pinned to one version, which deploy/Dockerfile installs with `--constraint`.
#
#   deploy/make-constraints.sh        (PYTHON=.venv/bin/python by default)
#
# pip resolves the server extra afresh, as in an empty environment
# (--ignore-installed), without installing anything (--dry-run); its report is
# what a `pip freeze` after that install would list. It resolves for the Python
# that runs it: use the image's (3.11 here, as Debian bookworm's and the CI
# stand-in's). Run it after changing a dependency in pyproject.toml, or to take
# newer releases; tests/test_deploy.py checks that the file pins every package
# the server extra needs, within pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
report=$(mktemp)
trap 'rm -f "$report"' EXIT

"$python" -m pip install --quiet --dry-run --ignore-installed --report "$report" '.[server]'
"$python" - "$report" >deploy/constraints.txt <<'EOF'
import json
import platform
import sys

with open(sys.argv[1]) as file:
    report = json.load(file)
pins = sorted(
    (item["metadata"]["name"].lower(), item["metadata"]["version"])
    for item in report["install"]
    if item["metadata"]["name"].lower() != "ntrain"
)
print("# Every package `pip install '.[server]'` installs, pinned: deploy/Dockerfile installs")
print("# with `--constraint` this file. Written by deploy/make-constraints.sh; do not edit.")
print(f"# Resolved by pip {report['pip_version']} for Python {platform.python_version()}.")
for name, version in pins:
    print(f"{name}=={version}")
EOF
echo "deploy/constraints.txt: $(grep -vc '^#' deploy/constraints.txt) packages pinned"
