#!/usr/bin/env bash
# Screenshot of the prediction service's docs page (RapiDoc at /api/docs/) for the README: docs/docs-page.png.
# Needs Debian's chromium (`apt-get install -y chromium`); not part of CI. Starts the prediction service on
# $PORT (default 18121) with Redis ensured as `make prediction-service` does, takes the picture, stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${PORT:-18121}
OUT=${OUT:-docs/docs-page.png}
# RapiDoc opens at this operation (the anchor of `predict`)
ANCHOR=${ANCHOR:-post-/api/fraud-service/0x2/predict}
. config/env.sh
LOG=$(mktemp)
$BIN/python -m fraud_poc.store.redis_server -- $BIN/hopeit_server run \
  --config-files=config/server-prediction.json,config/redis-streams.json,config/fraud-service.json \
  --api-file=config/openapi-service.json --start-streams --port="$PORT" >"$LOG" 2>&1 &
SERVICE=$!
trap 'kill -TERM $SERVICE 2>/dev/null; wait $SERVICE 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/api/docs/swagger.json" >/dev/null && break
  sleep 0.5
done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,900 \
  --virtual-time-budget=8000 --screenshot="$OUT" "http://127.0.0.1:$PORT/api/docs/#$ANCHOR" 2>/dev/null
echo "wrote $OUT"
