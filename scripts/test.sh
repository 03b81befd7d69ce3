#!/usr/bin/env bash
# Install what the test suite needs and run the whole suite: the README's test command, and exactly what CI
# (.ci/run) runs, so a new user runs the same suite as CI.
#   - Python test dependencies into .venv (created if missing), and helm into .venv/bin;
#   - the system packages some tests need (redis-server; chromium for the HTML report; rsyslog and
#     rsyslog-gnutls for the syslog sink; prometheus for the
#     alert rules and dashboard; kubernetes-client for kubectl kustomize): installed with apt-get when run as root on Debian/Ubuntu,
#     otherwise listed with the one command to run (without them those tests are skipped, not passed);
#   - Redis on 127.0.0.1:6379, started when absent.
# Needs: python3 (3.11+) with venv. Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)   # the HTML report is checked in a real headless browser
dpkg -s rsyslog-gnutls >/dev/null 2>&1 || missing+=(rsyslog rsyslog-gnutls)   # SIEM sink tests (syslog, TLS)
command -v prometheus >/dev/null || missing+=(prometheus)   # alert rules and dashboard against a real Prometheus
command -v kubectl >/dev/null || missing+=(kubernetes-client)   # kubectl kustomize builds deploy/kustomize
dpkg -s fortunes-bofh-excuses >/dev/null 2>&1 || missing+=(fortunes fortunes-bofh-excuses)   # text corpora (tests/text)
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: system packages missing: ${missing[*]}; the tests that need them will be SKIPPED." >&2
    echo "         install them first: sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# llama.cpp's OpenAI-compatible server for tests/text/test_llm.py, built from source (~4 min on 2 cores the first
# time; pip caches the wheel)
CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/python -m pip install -q "llama-cpp-python[server]==0.3.36"
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
