#!/usr/bin/env bash
# `make airflow`: the Airflow UI (airflow standalone: api-server, scheduler, dag-processor, triggerer)
# with the project's dags/ and plugins/ (the BCC pages under /bcc), on embedded defaults under ./var.
set -euo pipefail
source "$(dirname "$0")/env.sh"
PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="${AIRFLOW__API__BASE_URL:-http://localhost:$PORT}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://localhost:$PORT/execution/}"
bcc db upgrade >/dev/null
airflow db migrate >/dev/null 2>&1
mkdir -p "$BCC_HOME/inbox" "$BCC_HOME/landing/benign" "$BCC_HOME/landing/malignant"
pw_file="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
cat <<MSG

  Airflow UI:  http://localhost:$PORT
  BCC pages:   http://localhost:$PORT/bcc/predictions   ("BCC" in the Airflow navigation)
  Login:       admin / the password in $pw_file
               (written on first start; also printed below as "Password for user 'admin'")
  Next:
    - drop images to score into   $BCC_HOME/inbox/   (any nesting)
    - drop labelled images into   $BCC_HOME/landing/benign/ and $BCC_HOME/landing/malignant/
    - in the UI, unpause and trigger  bcc_score  (nightly 02:00 UTC) or  bcc_retrain  (weekly)
    - query results:  .venv/bin/bcc predictions   (or the latest_predictions view in $BCC_HOME/bcc.db)
  Stop with Ctrl-C.

MSG
exec airflow standalone
