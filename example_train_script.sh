#!/usr/bin/env bash
# Run a comparison table end to end, resumably: the sweep of train_base.py,
# train_kd.py and train_dml.py runs behind the README's tables.
#
# TABLE=seed (default), the seed's table:
#   1. the baselines (resnet20 and resnet110 on CIFAR-10 and CIFAR-100), whose
#      initial weights every student starts from and whose best weights teach;
#   2. every KD mode for each teacher->student pair on each dataset, with the
#      seed's hyperparameters (the registry's defaults: e.g. CRD's lambda_kd is
#      0.2 on CIFAR-10 and 0.8 on CIFAR-100);
#   3. DML for each pair (net2 starts from a fresh initialisation when both
#      nets share an architecture, or the two would stay identical).
# TABLE=crd, the CIFAR-100 benchmark of RepDistiller/mdistiller (Tian et al.,
#   "Contrastive Representation Distillation", ICLR 2020): --protocol crd
#   (240 epochs, batch 64, lr 0.05 or 0.01, decays at 150, 180, 210), the
#   baselines of the 13 pairs' networks, then every mode that applies to each
#   pair (`python -m kd_losses --applies T S` decides without training; the
#   others are listed as "# skipped: MODE does not apply to T->S: why"). No DML.
# Then summarise:  python summarize.py "$RESULTS"
#
# Settings (environment variables; unset takes the default, empty means none;
# `python sweep.py --help` lists them). Each value is checked, and a variable
# that looks like a misspelt setting (MODE, EPOCH, modes, DMLPAIRS) is refused:
#   TABLE=seed             seed | crd
#   DATA_ROOT=./datasets   where cifar-10-batches-py/ and cifar-100-python/ live
#   RESULTS=./results      results root: RESULTS/base/, RESULTS/<mode>/, RESULTS/dml/
#   GPUS="0"               GPUs to use (GPU=N works too); CUDA_VISIBLE_DEVICES per run
#   JOBS_PER_GPU=1         runs at once on each GPU (small students leave a GPU idle)
#   DATASETS="cifar10 cifar100"       (crd: cifar100)
#   MODES=<every registered mode>     KD modes, as `python -m kd_losses --names` (MODES="" runs none)
#   PAIRS="resnet20:resnet20 resnet110:resnet20 resnet110:resnet110"   teacher:student (crd: its 13)
#   DML_PAIRS="$PAIRS"                net1:net2 (DML_PAIRS="" runs none; crd: none)
#   SEEDS="2"              one full replicate per seed (the summary gives mean +- std)
#   EPOCHS=200             (crd: 240) another value shortens the schedule and adds
#                          -e<EPOCHS> to every run's name, so its runs stay apart
#   EXTRA_ARGS=""          appended to every command (e.g. "--no_download", "--device cpu")
#   KD_ARGS=""             appended to train_kd.py commands (e.g. "--init_epochs 5")
#   DRY_RUN=1              print the commands instead of running them (0/1, no/yes, false/true)
#   PYTHON=python
# A run is finished when its complete.json exists: it is skipped. One with a
# checkpoint is resumed (--resume), one stopped before its first checkpoint
# starts again (--overwrite): an interrupted sweep continues. A KD or DML run
# whose baselines are not finished is not started (reported, the rest goes on).
# Failures are appended to RESULTS/logs/failed.txt, one dated block per sweep,
# and listed at the end (exit 1). INT/TERM stop every run the sweep started.
set -euo pipefail
set -o noglob  # lists such as $MODES are split into words, never expanded as file patterns
cd "$(dirname "$0")"

die() { echo "error: $*" >&2; exit 2; }

# ---- the settings, checked before anything starts (also in a dry run): sweep.py
# has their table. A bad value, or a variable that looks like a misspelt setting
# (MODE=st, EPOCH=2), stops the sweep with one line `error: ...`. It prints them
# resolved (unset: the default), with what the script reads from the code in the
# same interpreter start: the networks' names and the number of CUDA devices.
PYTHON=${PYTHON-python}
[ -n "$PYTHON" ] || die "PYTHON is empty: unset it for python, or name one"
settings=$("$PYTHON" sweep.py check-settings) || {
    rc=$?
    (( rc != 2 )) || exit 2  # a bad setting: its one-line error is above
    die "$PYTHON cannot check the settings against the registries of modes, networks and datasets (its error is above)"
}
eval "$settings"  # TABLE DATA_ROOT RESULTS GPUS ... PYTHON DEFAULT_EPOCHS TAG ALL_NETWORKS CUDA_COUNT
read -r -a SEED_LIST <<< "$SEEDS"

# The schedule: every command gets --epochs (under the benchmark's protocol a
# shorter schedule keeps its lr decays at the same fractions of 150, 180, 210 of 240).
SCHEDULE=(--epochs "$EPOCHS")
SUFFIX=""
[ "$EPOCHS" = "$DEFAULT_EPOCHS" ] || SUFFIX="-e$EPOCHS"  # runs of another length stay apart
[ "$TABLE" = crd ] && SCHEDULE+=(--protocol crd)

read -r -a GPU_LIST <<< "$GPUS"
read -r -a EXTRA <<< "$EXTRA_ARGS"
read -r -a KD_EXTRA <<< "$KD_ARGS"
SLOTS=$(( ${#GPU_LIST[@]} * JOBS_PER_GPU ))
SLOT_PID=()
SLOT_DIR=()

# Names in run notes (resnet110 -> r110, others as they are) and each network's
# initial-weights file, as checkpoints.initial_weights_name names it
# (initial_r20.pth.tar, initial_vgg8.pth.tar). No subshells: a dry run lists hundreds of runs.
declare -A SHORT=() INITIAL=()
for net in $ALL_NETWORKS; do
    if [[ $net == resnet* ]]; then SHORT[$net]="r${net#resnet}"; else SHORT[$net]=$net; fi
    INITIAL[$net]="initial_${SHORT[$net]}.pth.tar"
done
run_id() {  # $1: dataset, then the networks: sets RUN_ID, e.g. c100-r110-r20-crd-s2 (with seed $seed)
    local data=$1 net
    shift
    RUN_ID="c${data#cifar}"
    for net in "$@"; do RUN_ID+="-${SHORT[$net]}"; done
    RUN_ID+="$TAG-s$seed$SUFFIX"
}
base_dir() { run_id "$1" "$2"; BASE_DIR="$RESULTS/base/base-$RUN_ID"; }  # sets BASE_DIR
finished() { [ -f "$1/complete.json" ]; }  # written after the last epoch's checkpoint, only then

# Where a command runs: the last --device (or --cuda) it is given, else CUDA when there is one.
runs_on_gpu() {
    local on=$(( CUDA_COUNT > 0 )) prev=""
    for word in "$@"; do
        case "$prev $word" in
            "--device cpu"|"--cuda 0") on=0 ;;
            "--device cuda"*|"--cuda 1") on=1 ;;
        esac
        case $word in --device=cpu) on=0 ;; --device=cuda*) on=1 ;; esac
        prev=$word
    done
    (( on ))
}

# ---- this sweep's bookkeeping: failures, and stopping its runs on INT/TERM or exit
FAILED_LIST="$RESULTS/logs/failed.txt"
STARTED=$(date '+%Y-%m-%d %H:%M:%S')
STATE=""
INTERRUPTED=""
if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$RESULTS/logs"
    STATE=$(mktemp -d "${TMPDIR:-/tmp}/kdzoo-sweep.XXXXXX")
    : > "$STATE/failed"
fi
# Each run gets its own process group (its pid), so stopping it stops what it started too.
if command -v setsid > /dev/null; then NEW_GROUP=(setsid); else
    NEW_GROUP=("$PYTHON" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])'); fi

stop_runs() {  # TERM every running run's process group, then KILL what is left after 10 s
    local pids=() pid i
    for i in "${!SLOT_PID[@]}"; do
        if kill -0 "${SLOT_PID[i]}" 2>/dev/null; then
            pids+=("${SLOT_PID[i]}")
            echo "stopped: ${SLOT_DIR[i]} (the sweep was interrupted; a rerun continues it)" >> "$STATE/failed"
        fi
    done
    [ -z "${!:-}" ] || pids+=("$!")  # the run started last, in case the signal came before SLOT_PID had it
    (( ${#pids[@]} )) || return 0
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$STATE" ] || exit "$rc"
    stop_runs
    local n
    n=$(grep -c . "$STATE/failed" || true)
    (( n == 0 || rc != 0 )) || rc=1
    {
        echo "=== sweep started $STARTED, ended $(date '+%Y-%m-%d %H:%M:%S'), exit $rc" \
             "(TABLE=$TABLE EPOCHS=$EPOCHS):${INTERRUPTED:+ interrupted by SIG$INTERRUPTED,}" \
             "$( (( n )) && echo "$n runs failed, not started or stopped" || echo "no run failed")"
        cat "$STATE/failed"
    } >> "$FAILED_LIST"
    if (( n )); then
        echo "$n runs of this sweep failed, were not started or were stopped (history: $FAILED_LIST):" >&2
        cat "$STATE/failed" >&2
    fi
    rm -rf "$STATE"
    exit "$rc"
}
on_signal() {
    INTERRUPTED=$1
    echo "sweep interrupted (SIG$1): stopping its runs" >&2
    exit "$2"
}
trap on_exit EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

not_started() {  # $1: run directory, $2: why
    echo "# not started: $1: $2"
    [ -z "$STATE" ] || echo "not started: $1: $2" >> "$STATE/failed"
}

free_slot() {  # sets SLOT to a slot whose run has ended, waiting if all are busy
    while true; do
        for ((i = 0; i < SLOTS; i++)); do
            if [ -z "${SLOT_PID[i]:-}" ] || ! kill -0 "${SLOT_PID[i]}" 2>/dev/null; then
                SLOT=$i
                return
            fi
        done
        wait -n 2>/dev/null || true
    done
}

launch() {  # $1: run directory, then the command
    local dir=$1 name out gpu
    shift
    local cmd=("$@" "${EXTRA[@]}")
    if finished "$dir"; then
        echo "# done, skipped: $dir"
        return
    fi
    if [ -f "$dir/checkpoint.pth.tar" ]; then
        cmd+=(--resume)
    elif [ -d "$dir" ]; then
        cmd+=(--overwrite)  # started, but stopped before its first checkpoint: start again
    fi
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "${cmd[@]}"
        echo
        return
    fi
    free_slot
    name=${dir##*/}
    out="$RESULTS/logs/$name.out"
    local gpu_env=()
    if runs_on_gpu "${cmd[@]}"; then
        gpu=${GPU_LIST[$(( SLOT % ${#GPU_LIST[@]} ))]}
        gpu_env=("CUDA_VISIBLE_DEVICES=$gpu")
        echo "[gpu $gpu] ${cmd[*]}"
    else
        echo "[cpu] ${cmd[*]}"
    fi
    # The run, in its own process group, records its own failure (with the run's error line).
    env "${gpu_env[@]}" "${NEW_GROUP[@]}" bash -c '
        out=$1 failed=$2 name=$3
        shift 3
        "$@" > "$out" 2>&1 < /dev/null && exit 0
        rc=$?
        reason=$(grep "^error: " "$out" | tail -n 1)
        echo "$name (exit $rc): $out${reason:+: $reason}" >> "$failed"
        exit "$rc"' run "$out" "$STATE/failed" "$name" "${cmd[@]}" &
    SLOT_PID[SLOT]=$!
    SLOT_DIR[SLOT]=$dir
}

barrier() {  # later runs need these results
    [ "$DRY_RUN" = 1 ] || wait
}

baselines_ready() {  # $1: run directory, then role:baseline-directory pairs; false (reported) if one is unfinished
    local dir=$1 spec
    shift
    [ "$DRY_RUN" != 1 ] || return 0  # a dry run lists the baselines it would run first
    for spec in "$@"; do
        if ! finished "${spec#*:}"; then
            not_started "$dir" "${spec%%:*} ${spec#*:} is not finished"
            return 1
        fi
    done
}

# ---- which modes apply to which pair (TABLE=crd: networks of other shapes; built, not trained)
declare -A APPLIES=() SKIP_LINES=()
if [ "$TABLE" = crd ] && [ -n "$MODES" ] && [ -n "$PAIRS" ] && [ -n "$SEEDS" ]; then
    for data in $DATASETS; do
        nets=()
        for pair in $PAIRS; do nets+=("${pair%%:*}" "${pair##*:}"); done
        answer=$("$PYTHON" -m kd_losses --applies "${nets[@]}" --why --data_name "$data" --protocol crd) ||
            die "python -m kd_losses --applies failed (see above)"
        i=-1
        read -r -a pairs <<< "$PAIRS"
        while IFS= read -r line; do
            if [[ $line == "# "* ]]; then
                SKIP_LINES["$data ${pairs[i]}"]+="$line"$'\n'
            else
                i=$((i + 1))
                APPLIES["$data ${pairs[i]}"]=" $line "
            fi
        done <<< "$answer"
    done
fi

# ---- 0. the data, checked (and fetched if missing) once, before runs read it in parallel
if [ "$DRY_RUN" != 1 ] && [ -n "$DATASETS" ] && [ -n "$SEEDS" ]; then
    fetch=()
    [[ " $EXTRA_ARGS " == *" --no_download "* ]] && fetch+=(--no_download)
    "$PYTHON" dataset.py "$DATA_ROOT" $DATASETS "${fetch[@]}"
fi

# ---- 1. baselines: every network a pair or DML uses
NETS=$(for p in $PAIRS $DML_PAIRS; do echo "${p%%:*}"; echo "${p##*:}"; done | sort -u)
for seed in $SEEDS; do
    for data in $DATASETS; do
        for net in $NETS; do
            base_dir "$data" "$net"
            launch "$BASE_DIR" "$PYTHON" -u train_base.py --data_name "$data" --net_name "$net" \
                --img_root "$DATA_ROOT" --save_root "$RESULTS/base" --note "${BASE_DIR##*/}" \
                "${SCHEDULE[@]}" --seed "$seed"
        done
    done
done
barrier

# ---- 2. every KD mode for every teacher -> student pair
for seed in $SEEDS; do
    for data in $DATASETS; do
        for pair in $PAIRS; do
            t=${pair%%:*}
            s=${pair##*:}
            if [ "$TABLE" = crd ] && [ "$seed" = "${SEED_LIST[0]}" ]; then
                for mode in $MODES; do  # each skipped mode once, with the reason
                    [[ ${APPLIES["$data $pair"]-} == *" $mode "* ]] ||
                        grep -F "# skipped: $mode does not apply" <<< "${SKIP_LINES["$data $pair"]}" || true
                done
            fi
            for mode in $MODES; do
                [ "$TABLE" != crd ] || [[ ${APPLIES["$data $pair"]-} == *" $mode "* ]] || continue
                run_id "$data" "$t" "$s"
                note="$mode-$RUN_ID"
                base_dir "$data" "$t"; t_dir=$BASE_DIR
                base_dir "$data" "$s"; s_dir=$BASE_DIR
                baselines_ready "$RESULTS/$mode/$note" "teacher:$t_dir" "student baseline:$s_dir" || continue
                launch "$RESULTS/$mode/$note" "$PYTHON" -u train_kd.py --data_name "$data" \
                    --t_name "$t" --s_name "$s" --kd_mode "$mode" \
                    --t_model "$t_dir/model_best.pth.tar" --s_init "$s_dir/${INITIAL[$s]}" \
                    --img_root "$DATA_ROOT" --save_root "$RESULTS/$mode" --note "$note" \
                    "${SCHEDULE[@]}" --seed "$seed" "${KD_EXTRA[@]}"
            done
        done
    done
done

# ---- 3. DML for every pair
for seed in $SEEDS; do
    for data in $DATASETS; do
        for pair in $DML_PAIRS; do
            n1=${pair%%:*}
            n2=${pair##*:}
            base_dir "$data" "$n1"; dir1=$BASE_DIR
            base_dir "$data" "$n2"; dir2=$BASE_DIR
            init2="$dir2/${INITIAL[$n2]}"
            [ "$n1" = "$n2" ] && init2=random
            run_id "$data" "$n1" "$n2"
            note="dml-$RUN_ID"
            baselines_ready "$RESULTS/dml/$note" "net1 baseline:$dir1" "net2 baseline:$dir2" || continue
            launch "$RESULTS/dml/$note" "$PYTHON" -u train_dml.py --data_name "$data" \
                --net1_name "$n1" --net2_name "$n2" --net1_init "$dir1/${INITIAL[$n1]}" \
                --net2_init "$init2" --img_root "$DATA_ROOT" --save_root "$RESULTS/dml" \
                --note "$note" "${SCHEDULE[@]}" --seed "$seed"
        done
    done
done
barrier

[ "$DRY_RUN" = 1 ] || [ -s "$STATE/failed" ] || echo "all runs done; summary: $PYTHON summarize.py $RESULTS"
