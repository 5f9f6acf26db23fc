#!/usr/bin/env bash
# OpenAPI files in config/ follow the code: `install/openapi.sh create` writes them anew,
# `install/openapi.sh check` fails when they are out of sync with the apps' events (used by `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
. config/env.sh
BIN="${BIN:-.venv/bin}"
VERSION=0.2.0
mode="${1:-check}"
declare -A TITLE=([training-pipeline]="Fraud Training Pipeline" [fraud-service]="Fraud Service")
declare -A ABOUT=(
  [training-pipeline]="fraud-poc training service: run the six-step pipeline (sample data to live model and feature store) and follow its runs"
  [fraud-service]="fraud-poc prediction service: real-time fraud scores from the live XGBoost model and the Redis feature store"
)
for pair in training-pipeline:openapi-training "fraud-service:openapi-service"; do
  app="${pair%%:*}"; spec="config/${pair##*:}.json"
  configs="config/server.json,config/redis-streams.json,config/$app.json"
  if [ "$mode" = create ]; then
    "$BIN/hopeit_openapi" create --title="${TITLE[$app]}" --description="${ABOUT[$app]}" \
      --api-version="$VERSION" --config-files="$configs" --output-file="$spec"
  else
    out=$(mktemp)
    if ! "$BIN/hopeit_openapi" update --api-version="$VERSION" --config-files="$configs" \
        --input-file="$spec" --output-file="$out" >/dev/null 2>&1 || ! diff -q "$spec" "$out" >/dev/null; then
      echo "$spec is out of sync with config/$app.json and its events: run 'install/openapi.sh create' and commit"
      diff "$spec" "$out" | head -40 || true
      rm -f "$out"; exit 1
    fi
    rm -f "$out"
  fi
done
