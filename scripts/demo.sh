#!/usr/bin/env bash
# `make demo`: the main job end to end through Airflow on embedded defaults (SQLite, ./var).
#   migrate → demo data → bcc_retrain (airflow dags test) → images into the inbox → bcc_score → report
set -euo pipefail
source "$(dirname "$0")/env.sh"
export BCC_PROFILE="${BCC_PROFILE:-demo}"
export BCC_SETTLE_SECONDS="${BCC_SETTLE_SECONDS:-0}"   # the demo writes its own files, atomically
start=$(date +%s)
log() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quiet() { "$@" > "$BCC_HOME/demo-step.log" 2>&1 || { tail -n 60 "$BCC_HOME/demo-step.log"; echo "demo: '$*' failed (full log: $BCC_HOME/demo-step.log)" >&2; exit 1; }; }

log "databases: project $(bcc config --json | python -c 'import json,sys; print(json.load(sys.stdin)["settings"]["database_url"])'), Airflow metadata in $AIRFLOW_HOME"
bcc db upgrade
quiet airflow db migrate

if [ -z "$(find "$BCC_HOME/landing" "$BCC_HOME/dataset" -type f 2>/dev/null | head -1)" ]; then
  log "synthetic demo tiles into $BCC_HOME/landing (112 benign, 127 malignant, as in the seed's data set)"
  bcc demo-data
fi

log "bcc_retrain through Airflow (airflow dags test): intake → split → train → evaluate → gate → publish"
airflow dags test bcc_retrain -c '{"profile": "demo", "force": true, "min_new_images": 0}' > "$BCC_HOME/demo-retrain.log" 2>&1 \
  || { grep -E "epoch|ERROR|Error|error" "$BCC_HOME/demo-retrain.log" | tail -40; echo "demo: bcc_retrain failed (log: $BCC_HOME/demo-retrain.log)" >&2; exit 1; }
grep -E "INFO - (training|epoch [0-9]+/[0-9]+:|evaluated|gate:)|^(training|epoch [0-9]+/[0-9]+:|evaluated|gate:)| (training v|epoch [0-9]+/[0-9]+: loss|evaluated v|gate: v)" "$BCC_HOME/demo-retrain.log" \
  | sed -E 's/.*(training v|epoch [0-9]+\/[0-9]+: loss|training done|evaluated v|gate: v)/\1/' | head -40 || true
grep -q "state=success" "$BCC_HOME/demo-retrain.log" || { echo "demo: bcc_retrain did not succeed (log: $BCC_HOME/demo-retrain.log)" >&2; exit 1; }

log "new unlabelled images dropped into $BCC_HOME/inbox"
batch="$BCC_HOME/inbox/demo-$(date +%Y%m%d-%H%M%S)"
bcc demo-data --out "$batch" --benign 12 --malignant 12 --seed "$(date +%s)" >/dev/null
find "$batch" -type f | wc -l | xargs printf '%s images\n'

log "bcc_score through Airflow (airflow dags test): plan → 2 mapped shards → finalize"
airflow dags test bcc_score -c '{"shards": 2}' > "$BCC_HOME/demo-score.log" 2>&1 \
  || { tail -n 60 "$BCC_HOME/demo-score.log"; echo "demo: bcc_score failed (log: $BCC_HOME/demo-score.log)" >&2; exit 1; }
grep -q "state=success" "$BCC_HOME/demo-score.log" || { echo "demo: bcc_score did not succeed (log: $BCC_HOME/demo-score.log)" >&2; exit 1; }

log "result"
bcc status
echo
echo "demo finished in $(( $(date +%s) - start ))s. Logs: $BCC_HOME/demo-retrain.log, $BCC_HOME/demo-score.log"
echo "Next: 'make airflow' for the Airflow UI; 'bcc predictions' to query the prediction table."
