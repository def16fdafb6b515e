#!/usr/bin/env bash
# `make demo`: the main job end to end through Airflow on embedded defaults (SQLite, ./var).
#   migrate → demo data in patient folders + a separate holdout → `bcc holdout extend` (logged)
#   → bcc_retrain → new labelled patients → bcc_retrain again (the candidate meets the champion on the
#   same frozen holdout) → images into the inbox → bcc_score → report
set -euo pipefail
source "$(dirname "$0")/env.sh"
export BCC_PROFILE="${BCC_PROFILE:-demo}"
export BCC_SETTLE_SECONDS="${BCC_SETTLE_SECONDS:-0}"   # the demo writes its own files, atomically
# Back-ends proven on each new champion during the demo (the others: `bcc validate-backends VERSION`);
# all of them would add minutes of conversion (ONNX export, INT8 quantization) to every promotion.
export BCC_PUBLISH_BACKENDS="${BCC_PUBLISH_BACKENDS:-openvino,openvino-bf16}"
start=$(date +%s)
log() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quiet() { "$@" > "$BCC_HOME/demo-step.log" 2>&1 || { tail -n 60 "$BCC_HOME/demo-step.log"; echo "demo: '$*' failed (full log: $BCC_HOME/demo-step.log)" >&2; exit 1; }; }
# What a reader needs from a retraining log: the split (roles, warnings), training, the holdout metrics
# with their intervals, the calibration, the threshold and the gate's rule and decision.
SHOWN='split: |training v|epoch [0-9]+/[0-9]+: loss|evaluated v|\(holdout\)|calibration: temperature|gate[ :(]|new champion|the champion stays'
retrain() {  # $1: a name for the log file
  local logf="$BCC_HOME/demo-retrain-$1.log"
  airflow dags test bcc_retrain -c '{"profile": "demo", "force": true, "min_new_images": 0}' > "$logf" 2>&1 \
    || { grep -E "epoch|ERROR|Error|error" "$logf" | tail -40; echo "demo: bcc_retrain failed (log: $logf)" >&2; exit 1; }
  grep -E "$SHOWN" "$logf" | grep -vE "Returned value was|DAG TEST|Skipping task|Marking task|Task instance|dependencies|Running task" \
    | sed -E 's/^.*\[(info|warning|error) *\] //; s/^.* (INFO|WARNING|ERROR) - //; s/ +\[[A-Za-z_.]+\]( loc=.*)?$//' \
    | grep -v '^- ' | awk '!seen[$0]++' | head -60 || true  # (the gate's markdown repeats its lines as "- ...")
  grep -q "state=success" "$logf" || { echo "demo: bcc_retrain did not succeed (log: $logf)" >&2; exit 1; }
}

log "databases: project $(bcc config --json | python -c 'import json,sys; print(json.load(sys.stdin)["settings"]["database_url"])'), Airflow metadata in $AIRFLOW_HOME"
bcc db upgrade
quiet airflow db migrate

if [ -z "$(find "$BCC_HOME/landing" "$BCC_HOME/dataset" -type f 2>/dev/null | head -1)" ]; then
  log "synthetic demo tiles: 239 into $BCC_HOME/landing in patient folders (112 benign, 127 malignant, as in the seed's data set), and a separate holdout of 300 tiles of other patients"
  bcc demo-data --holdout-out "$BCC_HOME/holdout-landing" --holdout 300
  log "the frozen holdout, taken in by an explicit, logged command (its images never enter development)"
  bcc holdout extend --from "$BCC_HOME/holdout-landing" --reason "demo: synthetic holdout of 60 patients that no development data comes from"
fi

log "bcc_retrain through Airflow (airflow dags test): intake → split → train → evaluate → gate → publish"
retrain first

log "new labelled tiles of 8 new patients land; bcc_retrain again: the candidate meets the champion on the same frozen holdout"
bcc demo-data --benign 20 --malignant 20 --seed 7 --first-patient 500 | tail -1
retrain second

log "new unlabelled images dropped into $BCC_HOME/inbox"
batch="$BCC_HOME/inbox/demo-$(date +%Y%m%d-%H%M%S)"
bcc demo-data --out "$batch" --benign 12 --malignant 12 --groups 0 --seed "$(date +%s)" >/dev/null
find "$batch" -type f | wc -l | xargs printf '%s images\n'

log "bcc_score through Airflow (airflow dags test): plan → 2 mapped shards → finalize"
airflow dags test bcc_score -c '{"shards": 2}' > "$BCC_HOME/demo-score.log" 2>&1 \
  || { tail -n 60 "$BCC_HOME/demo-score.log"; echo "demo: bcc_score failed (log: $BCC_HOME/demo-score.log)" >&2; exit 1; }
grep -q "state=success" "$BCC_HOME/demo-score.log" || { echo "demo: bcc_score did not succeed (log: $BCC_HOME/demo-score.log)" >&2; exit 1; }

log "result"
bcc holdout show | sed -n '1,3p;/^history/,$p'
echo
bcc status
echo
echo "demo finished in $(( $(date +%s) - start ))s. Logs: $BCC_HOME/demo-retrain-first.log, $BCC_HOME/demo-retrain-second.log, $BCC_HOME/demo-score.log"
echo "Next: 'make airflow' for the Airflow UI; 'bcc predictions' to query the prediction table; 'bcc holdout show'."
