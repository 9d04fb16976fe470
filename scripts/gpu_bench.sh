#!/usr/bin/env bash
# The GPU measurements of issue 4, made in one call on a borrowed GPU machine (CUDA, 16 cores):
#   1. one `best` net of 80 epochs (the preset then) and two-net ensembles (model.members=2) of `best` and
#      `best_aug` (on raw digits, shifted and sheared, as it was then) for the same compute, seeds 0-2, three
#      trials at a time on the one GPU (joblib);
#   2. benchmarks.search: the full search space (widths to 2048, depths to 3) with and without
#      Hyperband pruning, side by side, against (1)'s `best` runs as the reference.
# Both write to SQLite stores under the work folder; the stores and the logs come back as one tarball, and
# `python -m benchmarks.results` / `python -m benchmarks.search --report-only` turn them into docs (run from the
# checkout: the benchmarks/ folder is not part of the installed package).
#
#   bash scripts/gpu_bench.sh DATA_ROOT OUT_DIR [quick|full] [SEARCH_EPOCHS]
#
# quick: a few epochs of each piece, to check the machine and time one epoch, in about a minute.
# resume: RESUME_FROM=<the stores a stopped full run left> relaunches its search, which runs only what is missing.
# A machine without this project's packages gets them from wheels in .whl/ (installed into /tmp/site).
set -u
DATA=$(realpath "${1:?data root: the folder with the four MNIST IDX files}")
OUT=$(realpath "${2:?output folder}")
MODE=${3:-full}
EPOCHS=${4:-20}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries the script out on a machine without a GPU
W=/tmp/gpu-bench-${MODE/resume/full}
if [ "$MODE" = resume ]; then  # relaunch the search of a full run: RESUME_FROM holds what it left in $W
    mkdir -p "$W" "$OUT" && cp -r "${RESUME_FROM:?the folder with the stores of the stopped run}"/. "$W"/
else
    rm -rf "$W" && mkdir -p "$W" "$OUT"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
WHEELS=${WHEELS-.whl}  # WHEELS= (empty) uses the packages of the python3 on PATH as they are
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ] && ! [ -f /tmp/site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        && touch /tmp/site/.done || exit 1
fi
[ -n "$WHEELS" ] && [ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, mlflow, hydra, optuna; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'mlflow', mlflow.__version__, 'hydra', hydra.__version__, 'optuna', optuna.__version__)" || exit 1

STORE=sqlite:///$W/results.db
common=(data.root="$DATA" device="$DEVICE" trainer.progress=false mlflow.log_model=false mlflow.tracking_uri="$STORE")
# One short run first: it fills the decoded-data cache and creates the store before anything runs in parallel.
[ "$MODE" = resume ] || timeout 120 python3 train.py "${common[@]}" mlflow.experiment=smoke trainer.epochs=1 hydra.run.dir="$W/smoke" \
    >"$W/smoke.log" 2>&1 || { tail -30 "$W/smoke.log"; exit 1; }

sweep() {  # $1 = a name for its log and folder, then overrides: three seeds, three trials at a time
    local name=$1; shift
    timeout "$LIMIT" python3 train.py -m seed=0,1,2 "$@" "${common[@]}" mlflow.experiment=results \
        hydra/launcher=joblib hydra.launcher.n_jobs=3 hydra.sweep.dir="$W/multirun/$name" >"$W/$name.log" 2>&1 &
}
search() {  # $1 = trials, $2 = epochs, $3 = trials at a time in each search
    timeout "$LIMIT" python3 -m benchmarks.search --pruner hyperband --device "$DEVICE" --data-root "$DATA" \
        --trials "$1" --epochs "$2" --jobs "$3" --workdir "$W/search" --name gpu-hyperband-$MODE \
        --records "$W/records" --reference-experiment results --reference-uri "$STORE" \
        --out "$W/BENCHMARKS-search.md" >>"$W/search.log" 2>&1 &
}

start=$(date +%s)
if [ "$MODE" = quick ]; then
    LIMIT=150
    sweep best experiment=best trainer.epochs=2
    sweep best_aug experiment=best_aug trainer.epochs=2
    search 3 2 1
    # The widest, deepest net the search may pick, at its smallest batch: the slowest trial's epoch.
    python3 train.py "${common[@]}" mlflow.experiment=smoke model.hidden=2048 model.depth=3 data.batch_size=64 \
        trainer.epochs=2 hydra.run.dir="$W/widest" >"$W/widest.log" 2>&1 &
elif [ "$MODE" = resume ]; then
    LIMIT=${LIMIT:-450}
    search 40 "$EPOCHS" 2
else
    LIMIT=${LIMIT:-450}  # seconds each piece may take; what finished by then is kept
    sweep best experiment=best model.members=1 trainer.epochs=80  # one net of 80 epochs: the preset then
    # Two nets for the time of one (half the epochs each): does their vote beat one net on validation?
    sweep best_members2 experiment=best model.members=2 trainer.epochs=40
    # best_aug as it was then: raw digits, shifted and sheared too, no batch norm (the preset now deskews, sets
    # both to 0 and normalises each hidden layer)
    sweep best_aug_members2 experiment=best_aug model.members=2 trainer.epochs=80 data.deskew=false \
        data.augment.shift=0.1 data.augment.shear=8 model.norm=none
    search 40 "$EPOCHS" 2
fi
wait
echo "all done in $(($(date +%s) - start)) s"
for f in "$W"/*.log; do echo "== $f"; grep -E "epoch [0-9]+/|test/acc|val/acc|Error|error|Traceback" "$f" | tail -8; done
tar -czf "$OUT/gpu-bench-$MODE.tar.gz" -C "$W" --exclude='*.pt' --exclude='*.pkl' --exclude=artifacts \
    $(cd "$W" && ls -d *.db *.log *.md search records multirun 2>/dev/null)
ls -la "$OUT"
