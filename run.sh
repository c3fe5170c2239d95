#!/usr/bin/env bash
# The whole recipe, stage by stage (as ParallelWaveGAN's run.sh): pick a range with
# --stage/--stop-stage, a config with --conf; extra --set overrides go to every stage.
#
#   ./run.sh                                   # everything, on Clotho with conf.yaml
#   ./run.sh --stage 5 --stop-stage 5          # train only
#   ./run.sh --conf conf_demo.yaml --stage 1   # the demo after its data was generated
#   ./run.sh --stage 6 --run outputs/dcase2023_baseline-20260101-120000   # evaluate a run
#
# Stages: 0 download Clotho + PANNs | 1 captions -> audio_info/text csv | 2 log-mels
#         3 sentence embeddings | 4 PANNs -> CNN14_300.pth | 5 train (main.py)
#         6 score every pair -> scores.db | 7 metrics, retrieval CSVs, plots
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
conf=conf.yaml
stage=0
stop_stage=7
run=""
overrides=()

while [ $# -gt 0 ]; do
  case "$1" in
    --conf) conf=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --run) run=$2; shift 2 ;;
    --set) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do overrides+=("$1"); shift; done ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see ./run.sh --help)" >&2; exit 2 ;;
  esac
done

common=(--conf "$conf")
[ ${#overrides[@]} -gt 0 ] && common+=(--set "${overrides[@]}")
run_args=()
[ -n "$run" ] && run_args=(--run "$run")

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
step 5 "train" "$PYTHON" main.py "${common[@]}"
step 6 "score every (clip, caption) pair" "$PYTHON" postprocessing/01_xmodal_scores.py "${common[@]}" "${run_args[@]}"
step 7 "retrieval metrics" "$PYTHON" postprocessing/02_xmodal_retrieval.py "${common[@]}" "${run_args[@]}"
