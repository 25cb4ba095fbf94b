#!/usr/bin/env bash
# The README stays a front page (at most 250 lines) and no user page speaks of issues: history goes to
# CHANGELOG.md (docs/changelog.md only includes it).
set -euo pipefail
cd "$(dirname "$0")/.."
lines=$(wc -l < README.md)
if [ "$lines" -gt 250 ]; then
  echo "README.md: $lines lines (at most 250: move the detail into docs/)" >&2
  exit 1
fi
if hits=$(grep -rniE "issue [0-9]+" README.md docs/ | grep -v "^docs/changelog.md:"); then
  echo "issue-speak outside the changelog (state facts in the present tense; history goes to CHANGELOG.md):" >&2
  echo "$hits" >&2
  exit 1
fi
echo "README.md: $lines lines; no issue-speak in README.md or docs/"
