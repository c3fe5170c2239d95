#!/usr/bin/env bash
# The whole recipe, stage by stage (as ParallelWaveGAN's run.sh): pick a range with
# --stage/--stop-stage, a config with --conf; extra --set overrides go to every stage.
#
#   ./run.sh                                   # everything, on Clotho with conf.yaml
#   ./run.sh --stage 5 --stop-stage 5 --name my_run          # train only, into <output_dir>/my_run
#   ./run.sh --stage 5 --resume outputs/my_run               # continue that run, then evaluate it
#   ./run.sh --conf conf_demo.yaml --stage 1   # the demo after its data was generated
#   ./run.sh --stage 6 --run outputs/dcase2023_baseline-20260101-120000   # evaluate a run
#
# Stages: 0 download Clotho + PANNs | 1 captions -> audio_info/text csv | 2 log-mels
#         3 sentence embeddings | 4 PANNs -> CNN14_300.pth | 5 train (main.py)
#         6 score every pair -> scores.db | 7 metrics, retrieval CSVs, plots
# Runs:   --name NAME   stage 5 starts a new run called NAME; stages 6-7 evaluate it
#         --resume DIR  stage 5 continues run DIR; stages 6-7 evaluate it
#                       (after stage 5, stage 6 replaces the run's scores.db: training may have
#                       replaced the checkpoint it scored)
#         --run DIR     stages 6-7 evaluate DIR, or the run NAME in paths.output_dir (default:
#                       the run stage 5 just made, else the run trained last); with stage 5 in
#                       the range, it is resumed, never replaced by a new run
# Paths in the config are relative to the repository root; --conf, --run and --resume to where
# you call run.sh from (one that is not there is looked for from the root, as the config's).
set -euo pipefail
here=$PWD
cd "$(dirname "$0")"
root=$PWD

# the project's .venv (make venv) when there is one, so that it works without `source`
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
FIRST=0
LAST=7
conf=conf.yaml
stage=$FIRST
stop_stage=$LAST
run=""
resume=""
name=""
overrides=()

die() {  # one line on stderr, exit 2 (as the Python steps do for a user error)
  echo "run.sh: $*" >&2
  exit 2
}

value() {  # value "$@" (at OPTION): the word after OPTION, which must be there and not be an option
  if [ $# -lt 2 ] || [[ "$2" == --* ]]; then
    die "$1 needs a value (see ./run.sh --help)"
  fi
  printf '%s' "$2"
}

from_caller() {  # a path given relative to where run.sh was called from, for use from the root
  if [ "$here" != "$root" ] && [[ "$1" != /* ]] && [ -e "$here/$1" ]; then
    printf '%s/%s' "$here" "$1"
  else
    printf '%s' "$1"  # from the root, as it was given (a run's name: see --run in the scripts)
  fi
}

stage_number() {  # stage_number OPTION VALUE: an integer FIRST..LAST
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$((10#$2))" -gt "$LAST" ]; then
    die "$1 '$2' is not a stage number ($FIRST-$LAST)"
  fi
  printf '%d' "$((10#$2))"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --conf) v=$(value "$@"); conf=$(from_caller "$v"); shift 2 ;;
    --stage) v=$(value "$@"); stage=$(stage_number --stage "$v"); shift 2 ;;
    --stop-stage) v=$(value "$@"); stop_stage=$(stage_number --stop-stage "$v"); shift 2 ;;
    --run) v=$(value "$@"); run=$(from_caller "$v"); shift 2 ;;
    --resume) v=$(value "$@"); resume=$(from_caller "$v"); shift 2 ;;
    --name) name=$(value "$@"); shift 2 ;;
    --set)
      shift; n=${#overrides[@]}
      while [ $# -gt 0 ] && [[ "$1" != --* ]]; do overrides+=("$1"); shift; done
      [ ${#overrides[@]} -gt "$n" ] || die "--set needs KEY=VALUE pairs (see ./run.sh --help)" ;;
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see ./run.sh --help)" ;;
  esac
done

[ "$stage" -le "$stop_stage" ] || die "--stage $stage is after --stop-stage $stop_stage: nothing to run"
trains=false
[ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ] && trains=true
[ -n "$resume" ] && [ -n "$name" ] && die "--name starts a new run and --resume continues one: give one of them"
if [ -n "$run" ] && [ -n "$resume" ] && [ "$run" != "$resume" ]; then
  die "--run $run and --resume $resume name different runs"
fi
[ -n "$run" ] && [ -n "$name" ] && $trains && \
  die "--name starts a new run at stage 5 but --run $run names an existing one: give one of them"
[ -n "$name" ] && ! $trains && die "--name names the run that stage 5 trains; stages $stage-$stop_stage do not include 5"
# --run with stage 5 in the range: that run is continued, never shadowed by a new one
[ -n "$run" ] && $trains && resume=$run
[ -n "$resume" ] && [ -z "$run" ] && run=$resume
# a new run named at stage 5 is the one to evaluate, whatever else was trained meanwhile
[ -n "$name" ] && run=$name

common=(--conf "$conf")
[ ${#overrides[@]} -gt 0 ] && common+=(--set "${overrides[@]}")
train_args=()
[ -n "$resume" ] && train_args=(--resume "$resume")
[ -n "$name" ] && train_args=(--name "$name")
run_file=""
if $trains && [ -z "$run" ] && [ "$stop_stage" -ge 6 ]; then
  # a new run of a default name: stages 6-7 evaluate it, not the newest run in output_dir
  # (another job's, training beside this one)
  # TMPDIR may be a folder that is gone or not writable (a container, another job's): then /tmp
  run_file=$(mktemp "${TMPDIR:-/tmp}/run.sh.run.XXXXXX" 2>/dev/null || mktemp /tmp/run.sh.run.XXXXXX 2>/dev/null) \
    || die "cannot create a temporary file in ${TMPDIR:-/tmp} or /tmp: set TMPDIR to a writable folder"
  trap 'rm -f "$run_file"' EXIT
  train_args+=(--run-file "$run_file")
fi
run_args=()
[ -n "$run" ] && run_args=(--run "$run")
score_args=()
# training just now may have replaced the best checkpoint: its scores.db is then another
# checkpoint's, which 01 keeps unless told to replace it
$trains && score_args=(--overwrite)

step() {  # step N description command...
  local n=$1 what=$2; shift 2
  if [ "$stage" -le "$n" ] && [ "$stop_stage" -ge "$n" ]; then
    echo "=== stage $n: $what ==="
    "$@"
  fi
}

step 0 "download Clotho v2.1 and the PANNs checkpoint" "$PYTHON" preprocessing/00_download_clotho.py "${common[@]}"
step 1 "captions and audio index" "$PYTHON" preprocessing/01_clotho_dataset.py "${common[@]}"
step 2 "log-mel features" "$PYTHON" preprocessing/02_audio_logmel.py "${common[@]}"
step 3 "sentence embeddings" "$PYTHON" preprocessing/03_sbert_embeddings.py "${common[@]}"
step 4 "PANNs CNN14 -> audio encoder weights" "$PYTHON" preprocessing/04_cnn14_transfer.py "${common[@]}"
step 5 "train" "$PYTHON" main.py "${common[@]}" ${train_args[@]+"${train_args[@]}"}
if [ -n "$run_file" ] && [ -s "$run_file" ]; then run_args=(--run "$(cat "$run_file")"); fi
step 6 "score every (clip, caption) pair" "$PYTHON" postprocessing/01_xmodal_scores.py "${common[@]}" ${run_args[@]+"${run_args[@]}"} ${score_args[@]+"${score_args[@]}"}
step 7 "retrieval metrics" "$PYTHON" postprocessing/02_xmodal_retrieval.py "${common[@]}" ${run_args[@]+"${run_args[@]}"}
