# Deployment-specific values (hopeit requires every ${VAR} in config/ to be set).
# Source this file before `hopeit_server run ...`; values already in the environment win.
export FRAUD_REDIS_URL="${FRAUD_REDIS_URL:-redis://127.0.0.1:6379/0}"
export FRAUD_KEY_PREFIX="${FRAUD_KEY_PREFIX:-fraud:}"
export FRAUD_DATA_ROOT="${FRAUD_DATA_ROOT:-$(pwd)/data}"
export DASK_SCHEDULER_ADDRESS="${DASK_SCHEDULER_ADDRESS:-}"
# Security (docs/security.md): the API token of the endpoints that start work or change what is live.
# Empty (the default) refuses every call to them; `make run` and `make up` generate one for their session.
export FRAUD_API_TOKEN="${FRAUD_API_TOKEN:-}"
export FRAUD_FIND_ORDERS_ENABLED="${FRAUD_FIND_ORDERS_ENABLED:-false}"
export FRAUD_PREDICT_REQUIRES_TOKEN="${FRAUD_PREDICT_REQUIRES_TOKEN:-true}"  # false: predict and predict-batch open to anyone
