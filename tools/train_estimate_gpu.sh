#!/bin/bash
# Train convolving calcium estimates (lab calcium_estimate.py) in one run on a lent GPU machine.
#
# Why a script: a lent machine is held for minutes, starts bare, and returns only files under $OUT; this is
# the whole run as one command. It extracts the validation and training regions with every core (the
# training extraction stops after XLIMIT seconds: the studies it finished are the training set, and the
# train log lists them, so `calcium_estimate extract --studies-from LOG` replays it), then trains one
# estimate per convolution width (WIDTHS) side by side on the GPU until DEADLINE seconds after the start.
#
# The machine has PyTorch, numpy and scipy but not pydicom, highdicom or pyjpegls, which the engine's
# modules import; carry them as wheels in .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydicom==3.0.2 highdicom==0.28.2 pyjpegls==1.5.1
# and run `N=1500 WORKERS=16 XLIMIT=210 DEADLINE=545 bash tools/train_estimate_gpu.sh` with .whl carried.
# Here (no GPU), PY=.venv/bin/python with small N and DEADLINE runs the same steps on the CPU (a smoke test).
T0=$(date +%s)
PY=${PY:-python3}; N=${N:-900}; NV=${NV:-60}; WORKERS=${WORKERS:-16}; DEADLINE=${DEADLINE:-540}
DATA=${DATA:-/tmp/cx}; OUT=${OUT:-runs/gpu}; WIDTHS=${WIDTHS:-16 32}; XLIMIT=${XLIMIT:-200}
mkdir -p "$OUT"
if [ "$PY" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD:$PWD/lab
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null; nproc; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"
E=(--engine 'method = "subtract"' --engine 'confidence = false'
   --engine 'scanner_kernels = { SOFT = 3.5, STANDARD = 4.3, HD = 5.2, SHARP = 6.3 }')
X=(--context-voxels 2 --level-away-mm 2.0 --workers "$WORKERS")
OMP_NUM_THREADS=1 $PY -m dicom_node_lab.calcium_estimate extract --out "$DATA" --seed 7171 --studies "$NV" \
  "${X[@]}" "${E[@]}" 2>&1 | tail -1 | tr '\r' '\n' | tail -1
OMP_NUM_THREADS=1 timeout -s KILL "$XLIMIT" $PY -m dicom_node_lab.calcium_estimate extract --out "$DATA" \
  --seed 7070 --studies "$N" --jitter 0.15 "${X[@]}" "${E[@]}" 2>&1 | tail -1 | tr '\r' '\n' | tail -1
pkill -9 -f "calcium_estimate extract"; sleep 1
# a study file cut short by the time limit is dropped: the training reads only whole ones
$PY -c "
import pathlib, numpy as np
bad = 0
for f in pathlib.Path('$DATA').glob('*.npy'):
    try:
        np.load(f, allow_pickle=True)
    except Exception:
        f.unlink(); bad += 1
print(len(list(pathlib.Path('$DATA').glob('7070-*.npy'))), 'training studies,', bad, 'cut short')"
EL=$(( $(date +%s) - T0 )); echo "extracted in ${EL} s"
MIN=$(python3 -c "print(max(0.5, ($DEADLINE - $EL - 75) / 60))")  # 75 s: loading the regions, the last check
echo "training for $MIN minutes"
T=(--data "$DATA" --minutes "$MIN" --steps 0 --validate-every 2000 --seed 1 --lr 1e-3 --width 32 --layers 2
   --lumen-weight 0.1 --closing-weight 2 --convolutions 2)
for w in $WIDTHS; do
  OMP_NUM_THREADS=2 $PY -m dicom_node_lab.calcium_estimate train "${T[@]}" --convolution-width "$w" \
    --out "$OUT/c$w.npz" > "$OUT/c$w.log" 2>&1 &
done
wait
for w in $WIDTHS; do tail -n 2 "$OUT/c$w.log"; done
echo "done in $(( $(date +%s) - T0 )) s"
