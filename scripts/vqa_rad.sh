#!/usr/bin/env bash
# VQA-RAD end to end with one command (`make vqa-rad`): stage 1 align, stage 2 LoRA instruct, the
# question-only baseline of the same LM, then the test-split evaluation (image / blank / noise /
# blind / blind_trained / image+VCD, majority baseline, 95% CIs) and the templated question set.
# Every step resumes where it stopped. VQA_EPOCHS=N sets the epochs of all three trainings (the
# configs' own: 2 / 3 / 5); the model card says which were used for its numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDAI=${MEDAI:-.venv/bin/medai}
RUNS=${RUNS:-runs}
epochs=()
if [[ -n "${VQA_EPOCHS:-}" ]]; then epochs=(-o "trainer.epochs=${VQA_EPOCHS}"); fi
export MEDAI_DATA=${MEDAI_DATA:-$(cd ../shared/data 2>/dev/null && pwd)}

"$MEDAI" finetune configs/vqa_rad_align.yaml "${epochs[@]}" -o "output_dir=$RUNS"
# The test split is scored once, below, for both models under every condition.
"$MEDAI" finetune configs/vqa_rad_instruct.yaml "${epochs[@]}" -o "output_dir=$RUNS" -o trainer.evaluate_test=false \
  -o "model.pretrained=$RUNS/vqa_rad_align/checkpoints/best/model.safetensors"
"$MEDAI" finetune configs/vqa_rad_blind.yaml "${epochs[@]}" -o "output_dir=$RUNS" -o trainer.evaluate_test=false
"$MEDAI" vlm eval --run "$RUNS/vqa_rad_instruct" --blind-run "$RUNS/vqa_rad_blind" --out "$RUNS/vqa_rad_eval"
"$MEDAI" vlm templated --run "$RUNS/vqa_rad_instruct" --blind-run "$RUNS/vqa_rad_blind" --out "$RUNS/vqa_templated_eval"
