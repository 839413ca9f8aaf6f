#!/usr/bin/env bash
# Rebuild the JupyterLab extension into kernel_sandbox/approvals/labextension (committed, so
# that users and CI need no Node). Needs Node 20+, npm and the JupyterLab 4 it is built against
# (pip install jupyterlab): its staging folder is the "core" the extension shares packages with.
set -euo pipefail
cd "$(dirname "$0")"
[[ -d node_modules ]] || npm ci --no-audit --no-fund
rm -rf lib tsconfig.tsbuildinfo ../kernel_sandbox/approvals/labextension
npx tsc
CORE=$(python3 -c "import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), 'staging'))")
npx build-labextension --core-path "$CORE" .
