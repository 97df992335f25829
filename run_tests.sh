#!/usr/bin/env bash
# Create .venv when missing, install pinned requirements (and the browser for the UI test), run pytest.
# Usage: ./run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when requirements.txt changed since the last successful install.
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -r requirements.txt -r requirements-test.txt
  echo "$want" > "$stamp"
fi

# The real-browser UI test drives Debian's chromium (Playwright cannot download browsers here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  else
    echo "warning: chromium not found; the browser test will be skipped" >&2
  fi
fi

export CORGI_CACHE=${CORGI_CACHE:-$PWD/.cache/corgi}
# Two workers, one test file each at a time (module-scoped servers stay in one process): much of
# the suite waits on server, browser and CLI subprocesses, so two workers fit two cores.
# tests/conftest.py (pytest_xdist_make_scheduler) hands out the longest files first and keeps files
# that share a session-scoped server or subprocess on one worker.
exec .venv/bin/python -m pytest -q -n "${CORGI_TEST_WORKERS:-2}" --dist loadfile "$@"
