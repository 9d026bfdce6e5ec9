#!/usr/bin/env bash
# Run the whole test suite (slow multi-process tests included): bash launch/test.sh [pytest args]
POCL_EXTRAS=dev
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -m ruff check pocl_ds launch tests
"$PY" -m pytest -q --timeout 900 "$@" tests
