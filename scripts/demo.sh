#!/usr/bin/env bash
# Set up, start a local region in the background, deploy the demo function and invoke it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cc=.venv/bin/cellcloud
if ! $cc status >/dev/null 2>&1; then
  $cc up --detach
fi
$cc deploy hello examples/hello --handler app.handler
echo "invoke hello {\"a\": 1, \"b\": 2} ->"
$cc invoke hello --payload '{"a": 1, "b": 2}'
cat <<MSG

The region keeps running. Try:
  . .venv/bin/activate
  cellcloud status                 # processes, cells, agents, environments
  cellcloud invoke hello -p '{"a": 20, "b": 22}' --log
  cellcloud logs hello
  cellcloud down                   # stop the region
MSG
