#!/usr/bin/env bash
# Reproduce the seed's comparison table end to end:
#   1. the baselines (resnet20 and resnet110 on CIFAR-10 and CIFAR-100), whose
#      initial weights every student starts from and whose best weights teach;
#   2. every KD mode for each teacher->student pair on each dataset, with the
#      seed's hyperparameters (the registry's defaults: e.g. CRD's lambda_kd is
#      0.2 on CIFAR-10 and 0.8 on CIFAR-100);
#   3. DML for each pair (net2 starts from a fresh initialisation when both
#      nets share an architecture, or the two would stay identical).
# Then summarise:  python summarize.py "$RESULTS"
#
# Settings (environment variables; unset takes the default, empty means none):
#   DATA_ROOT=./datasets   where cifar-10-batches-py/ and cifar-100-python/ live
#   RESULTS=./results      results root: RESULTS/base/, RESULTS/<mode>/, RESULTS/dml/
#   GPUS="0"               GPUs to use (GPU=N works too); CUDA_VISIBLE_DEVICES per run
#   JOBS_PER_GPU=1         runs at once on each GPU (small students leave a GPU idle)
#   DATASETS="cifar10 cifar100"
#   MODES="logits st ... crd"         KD modes (MODES="" runs none)
#   PAIRS="resnet20:resnet20 resnet110:resnet20 resnet110:resnet110"   teacher:student
#   DML_PAIRS="$PAIRS"                net1:net2 (DML_PAIRS="" runs none)
#   SEEDS="2"              one full replicate per seed (the summary gives mean +- std)
#   EPOCHS=200
#   EXTRA_ARGS=""          appended to every command (e.g. "--no_download")
#   KD_ARGS=""             appended to train_kd.py commands (e.g. "--init_epochs 5")
#   DRY_RUN=1              print the commands instead of running them
#   PYTHON=python
# A run whose metrics show its last epoch is skipped; one with a checkpoint
# but unfinished is resumed (--resume), one stopped before its first
# checkpoint starts again (--overwrite): an interrupted sweep continues.
set -euo pipefail
cd "$(dirname "$0")"

DATA_ROOT=${DATA_ROOT-./datasets}
RESULTS=${RESULTS-./results}
GPUS=${GPUS-${GPU-0}}
JOBS_PER_GPU=${JOBS_PER_GPU-1}
DATASETS=${DATASETS-cifar10 cifar100}
MODES=${MODES-logits st at fitnet nst pkt fsp ft rkd ab sp sobolev bss cc lwm irg vid ofd afd crd}
PAIRS=${PAIRS-resnet20:resnet20 resnet110:resnet20 resnet110:resnet110}
DML_PAIRS=${DML_PAIRS-$PAIRS}
SEEDS=${SEEDS-2}
EPOCHS=${EPOCHS-200}
EXTRA_ARGS=${EXTRA_ARGS-}
KD_ARGS=${KD_ARGS-}
DRY_RUN=${DRY_RUN-0}
PYTHON=${PYTHON-python}

read -r -a GPU_LIST <<< "$GPUS"
read -r -a EXTRA <<< "$EXTRA_ARGS"
read -r -a KD_EXTRA <<< "$KD_ARGS"
SLOTS=$(( ${#GPU_LIST[@]} * JOBS_PER_GPU ))
(( SLOTS > 0 )) || { echo "error: GPUS and JOBS_PER_GPU must give at least one slot" >&2; exit 2; }
SLOT_PID=()
FAILED_LIST="$RESULTS/logs/failed.txt"

short_net() { echo "r${1#resnet}"; }                            # resnet110 -> r110
short_data() { [ "$1" = cifar10 ] && echo c10 || echo c100; }

finished() {  # $1: run directory; true when its metrics end with the main stage's last epoch
    local last
    [ -f "$1/metrics.csv" ] || return 1
    last=$(tail -n 1 "$1/metrics.csv" | cut -d, -f1,3)
    [ "$last" = "main,$EPOCHS" ]
}

free_slot() {  # sets SLOT to a slot whose job has ended, waiting if all are busy
    while true; do
        for ((i = 0; i < SLOTS; i++)); do
            if [ -z "${SLOT_PID[$i]:-}" ] || ! kill -0 "${SLOT_PID[$i]}" 2>/dev/null; then
                SLOT=$i
                return
            fi
        done
        wait -n 2>/dev/null || true
    done
}

launch() {  # $1: run directory, then the command
    local dir=$1 name
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
    local gpu=${GPU_LIST[$(( SLOT % ${#GPU_LIST[@]} ))]}
    name=$(basename "$dir")
    mkdir -p "$RESULTS/logs"
    echo "[gpu $gpu] ${cmd[*]}"
    (
        if CUDA_VISIBLE_DEVICES=$gpu "${cmd[@]}" > "$RESULTS/logs/$name.out" 2>&1; then :; else
            echo "$name (exit $?): $RESULTS/logs/$name.out" >> "$FAILED_LIST"
        fi
    ) &
    SLOT_PID[$SLOT]=$!
}

barrier() {  # later runs need these results
    [ "$DRY_RUN" = 1 ] || wait
}

base_dir() { echo "$RESULTS/base/base-$(short_data "$1")-$(short_net "$2")-s$3"; }

[ "$DRY_RUN" = 1 ] || { mkdir -p "$RESULTS/logs"; rm -f "$FAILED_LIST"; }

# ---- 0. the data, checked (and fetched if missing) once, before runs read it in parallel
if [ "$DRY_RUN" != 1 ] && [ -n "$DATASETS" ]; then
    fetch=()
    [[ " $EXTRA_ARGS " == *" --no_download "* ]] && fetch+=(--no_download)
    "$PYTHON" dataset.py "$DATA_ROOT" $DATASETS "${fetch[@]}"
fi

# ---- 1. baselines: every network a pair or DML uses
NETS=$(for p in $PAIRS $DML_PAIRS; do echo "${p%%:*}"; echo "${p##*:}"; done | sort -u)
for seed in $SEEDS; do
    for data in $DATASETS; do
        for net in $NETS; do
            dir=$(base_dir "$data" "$net" "$seed")
            launch "$dir" "$PYTHON" -u train_base.py --data_name "$data" --net_name "$net" \
                --img_root "$DATA_ROOT" --save_root "$RESULTS/base" --note "$(basename "$dir")" \
                --epochs "$EPOCHS" --seed "$seed"
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
            for mode in $MODES; do
                note="$mode-$(short_data "$data")-$(short_net "$t")-$(short_net "$s")-s$seed"
                launch "$RESULTS/$mode/$note" "$PYTHON" -u train_kd.py --data_name "$data" \
                    --t_name "$t" --s_name "$s" --kd_mode "$mode" \
                    --t_model "$(base_dir "$data" "$t" "$seed")/model_best.pth.tar" \
                    --s_init "$(base_dir "$data" "$s" "$seed")/initial_$(short_net "$s").pth.tar" \
                    --img_root "$DATA_ROOT" --save_root "$RESULTS/$mode" --note "$note" \
                    --epochs "$EPOCHS" --seed "$seed" "${KD_EXTRA[@]}"
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
            init2="$(base_dir "$data" "$n2" "$seed")/initial_$(short_net "$n2").pth.tar"
            [ "$n1" = "$n2" ] && init2=random
            note="dml-$(short_data "$data")-$(short_net "$n1")-$(short_net "$n2")-s$seed"
            launch "$RESULTS/dml/$note" "$PYTHON" -u train_dml.py --data_name "$data" \
                --net1_name "$n1" --net2_name "$n2" \
                --net1_init "$(base_dir "$data" "$n1" "$seed")/initial_$(short_net "$n1").pth.tar" \
                --net2_init "$init2" --img_root "$DATA_ROOT" --save_root "$RESULTS/dml" \
                --note "$note" --epochs "$EPOCHS" --seed "$seed"
        done
    done
done
barrier

if [ "$DRY_RUN" != 1 ] && [ -s "$FAILED_LIST" ]; then
    echo "some runs failed:" >&2
    cat "$FAILED_LIST" >&2
    exit 1
fi
[ "$DRY_RUN" = 1 ] || echo "all runs done; summary: $PYTHON summarize.py $RESULTS"
