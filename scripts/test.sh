#!/usr/bin/env bash
# Install the test dependencies into .venv (created if missing) and run the whole test suite.
# This is the README's test command and exactly what CI (.ci/run) runs.
# Needs: python3 (3.11+) with venv, and Redis on 127.0.0.1:6379 (started here when absent and redis-server exists).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
VIRTUAL_ENV="$PWD/.venv" scripts/install-helm.sh .venv/bin >/dev/null

if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    sleep 0.5
  else
    echo "warning: no Redis on 127.0.0.1:6379 and no redis-server to start; Redis tests will fail" >&2
  fi
fi

export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
