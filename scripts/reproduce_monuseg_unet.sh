#!/usr/bin/env bash
# Reproduce LViT's U-Net on MoNuSeg (LViT: 76.45 Dice / 62.86 IoU on the 14 test images) with LViT's own
# protocol: nets/UNet.py, WeightedDiceBCE(0.5, 0.5), Adam 1e-3, cosine warm restarts per epoch, batch 2,
# RandomGenerator augmentation, up to 2000 epochs with early stopping (patience 50), best-on-val, seed 666;
# see docs/fidelity.md.
#
#   bash scripts/reproduce_monuseg_unet.sh SRC OUT [--budget-min 75] [--threads 2]
#
# SRC: a folder in LViT's layout (Train_Folder/, Val_Folder/, optionally Test_Folder/); OUT: a new folder.
# Prepares SRC at 224×224 as LViT's loader does, trains `lvit-unet`, scores the validation split, and leaves
# OUT/lvit-unet, a run that `textseg eval OUT/lvit-unet --split test --eval-size 224` scores when SRC holds
# Test_Folder (never used here).
#
# Time budget: --budget-min (or BUDGET_MIN, default 75) caps the whole script; training gets what is left
# after preparation minus EVAL_RESERVE_MIN (default 3) and stops cleanly before an epoch that would not fit.
# When that happens before early stopping, the protocol is NOT complete and the script says so (it never
# shortens the protocol silently). --budget-min 0 means no budget (the full protocol).
# Precision: PRECISION=auto (default: bf16 on CPUs with bf16 units and on CUDA, else fp32), fp32 or bf16;
# the run's env.json and the summary say what ran.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '7,8p' "$0" | sed 's/^# //' >&2; exit 2; }
[ $# -ge 2 ] || usage
SRC=$1 OUT=$2
shift 2
BUDGET_MIN=${BUDGET_MIN:-75}
THREADS=${THREADS:-2}
while [ $# -gt 0 ]; do
  case $1 in
    --budget-min) BUDGET_MIN=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
EVAL_RESERVE_MIN=${EVAL_RESERVE_MIN:-3}
if [ -z "${TEXTSEG:-}" ]; then
  if [ -x .venv/bin/textseg ]; then TEXTSEG=.venv/bin/textseg; else TEXTSEG=textseg; fi
fi
T=$TEXTSEG
PY=${PYTHON:-python3}  # arithmetic and the summary only (standard library)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=$THREADS
[ -d "$SRC" ] || { echo "error: SRC $SRC is not a folder" >&2; exit 2; }
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: OUT $OUT exists and is not empty (choose a new folder)" >&2; exit 2
fi
START=$(date +%s)
elapsed_min() { "$PY" -c "import sys; print(round((int(sys.argv[1]) - int(sys.argv[2])) / 60, 2))" "$(date +%s)" "$START"; }

echo "== prepare $SRC at 224×224 as LViT's loader (bilinear, /255, masks bilinear > 0)"
$T prep lvit --src "$SRC" --out "$OUT/data" --resize 224 --protocol lvit

TRAIN_SETS=()
if [ "$BUDGET_MIN" != "0" ]; then
  LEFT=$("$PY" -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]) - float(sys.argv[3]), 2))" \
    "$BUDGET_MIN" "$(elapsed_min)" "$EVAL_RESERVE_MIN")
  if "$PY" -c "import sys; sys.exit(float(sys.argv[1]) > 0)" "$LEFT"; then
    echo "error: --budget-min $BUDGET_MIN leaves no time to train after preparation" >&2; exit 2
  fi
  TRAIN_SETS+=(--set "train.time_budget_min=$LEFT")
  echo "== time budget: $BUDGET_MIN min in all; training may use $LEFT min (train.time_budget_min)"
else
  echo "== no time budget: the full protocol (up to 2000 epochs, early stopping after 50)"
fi
PRECISION_ARGS=(--precision "${PRECISION:-auto}")
echo "== precision: ${PRECISION:-auto} (what it resolves to is in the summary)"

echo "== train lvit-unet (LViT's protocol: textseg_cli/configs/lvit-unet.yaml)"
$T train --method lvit-unet --data "$OUT/data" --out "$OUT/lvit-unet" --threads "$THREADS" \
  "${PRECISION_ARGS[@]}" "${TRAIN_SETS[@]}"

echo "== evaluate on the validation split (224×224, threshold 0.5, per image, averaged)"
$T eval "$OUT/lvit-unet" --split val --eval-size 224

"$PY" - "$OUT" "$(elapsed_min)" <<'EOF'
import csv, json, sys
from pathlib import Path

out, minutes = Path(sys.argv[1]), sys.argv[2]
run = out / "lvit-unet"
end = json.loads((run / "training.json").read_text())
evals = sorted((run / "eval").glob("val-*"))
rows = list(csv.DictReader(open(evals[-1] / "per_case.csv"))) if evals else []
fg = [r for r in rows if r.get("class_name", "") != "background"]
dice = sum(float(r["dice"]) for r in fg) / max(1, len(fg))
iou = sum(float(r["jaccard"]) for r in fg) / max(1, len(fg))
ep = end["epochs"] or 0
prec = json.loads((run / "env.json").read_text()).get("precision", {}).get("train", {})
print(f"\n== summary ({minutes} min wall)")
print(f"precision: {prec.get('precision', '?')} (asked {prec.get('requested', '?')}: {prec.get('reason', '')})")
print(f"epochs trained: {ep} of up to 2000; ended: {end['ended']}" + (f" ({end['reason']})" if end["reason"] else ""))
print(f"best checkpoint: epoch {end['best_epoch']} (val Dice in training {end['best_val_dice']})"
      if end["best_epoch"] else "best checkpoint: none (LViT keeps no best model in epochs 1-5); eval used last.pt")
print(f"validation ({len(fg)} images, {evals[-1].name if evals else '-'}): Dice {100 * dice:.2f}  IoU {100 * iou:.2f}")
if ep:
    print(f"time per epoch: {end['train_seconds'] / ep:.1f} s (training and validation)")
    log = [r for r in csv.DictReader(open(run / "log.csv")) if r.get("val_dice")]
    step = max(1, len(log) // 10)  # about ten points of the validation curve (one validation per epoch)
    pts = [(i + 1, float(r["val_dice"])) for i, r in enumerate(log)
           if i == 0 or (i + 1) % step == 0 or i + 1 == len(log)]
    print("validation Dice by epoch: " + ", ".join(f"{e}: {100 * d:.1f}" for e, d in pts) + f"  ({run / 'curves.png'})")
if end["ended"] == "time_budget":
    print("PROTOCOL NOT COMPLETE: the time budget stopped training before early stopping; these are not the "
          "protocol's numbers. Rerun with a larger --budget-min (0 = no budget) to finish it.")
print(f"test (held out): textseg eval {run} --split test --eval-size 224")
EOF
