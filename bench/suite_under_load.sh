#!/usr/bin/env bash
# The full test suite N times back to back while a second copy of it loops beside them: the
# loaded-machine check of issue 9 (a flaky test shows up here, not on an idle machine).
#
#   bash bench/suite_under_load.sh [N=3] [LOGDIR=suite_under_load]
#
# Prints one line per timed run (exit status, wall time, pytest's summary) and the background
# runs' summaries; exit status 0 when every run, timed or background, passed.
set -uo pipefail
runs="${1:-3}"
logs="${2:-suite_under_load}"
mkdir -p "$logs"
rm -f "$logs"/*.log "$logs/done"
(
  i=0
  while [ ! -f "$logs/done" ]; do
    i=$((i + 1))
    python -m pytest -q -p no:cacheprovider > "$logs/background$i.log" 2>&1
    echo "$?" > "$logs/background$i.rc"
  done
) &
background=$!
rc=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  python -m pytest -q -p no:cacheprovider > "$logs/run$i.log" 2>&1
  status=$?
  [ "$status" -eq 0 ] || rc=1
  echo "run $i: rc=$status wall=$(( $(date +%s) - start ))s $(tail -n 1 "$logs/run$i.log")"
done
touch "$logs/done"
wait "$background"
for f in "$logs"/background*.rc; do
  name=$(basename "$f" .rc)
  [ "$(cat "$f")" -eq 0 ] || rc=1
  echo "$name (load): rc=$(cat "$f") $(tail -n 1 "$logs/$name.log")"
done
exit "$rc"
