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
#   others are listed as "# skipped: MODE does not apply to T->S: why"), and
#   KD with --optimizer dot (DOT) on the three pairs of its authors' configs
#   (RESULTS/st_dot/). No DML.
# Then summarise:  python summarize.py "$RESULTS"
#
#
# This file is the table: its settings and its commands. sweep.py runs them:
# which are done, which resume or start again, which wait for their baselines,
# where each goes (this machine's GPUs, or a SLURM cluster), what failed.
#
# Settings (environment variables; unset takes the default, empty means none;
# `python sweep.py --help` lists them). Each value is checked, and a variable
# that looks like a misspelt setting (MODE, EPOCH, modes, DMLPAIRS) is refused:
#   TABLE=seed             seed | crd
#   DATA_ROOT=./datasets   where cifar-10-batches-py/ and cifar-100-python/ live
#   RESULTS=./results      results root: RESULTS/base/, RESULTS/<mode>/, RESULTS/shared/, RESULTS/dml/
#   TEACHERS=""            released CIFAR-100 teachers (RepDistiller or mdistiller layout):
#                          not trained, each checked once (python teachers.py verify)
#   GPUS="0"               GPUs to use (GPU=N works too); CUDA_VISIBLE_DEVICES per run
#   JOBS_PER_GPU=1         runs at once on each GPU (small students leave a GPU idle)
#   DATASETS="cifar10 cifar100"       (crd: cifar100)
#   MODES=<every registered mode>     KD modes, as `python -m kd_losses --names` (MODES="" runs none)
#   PAIRS="resnet20:resnet20 resnet110:resnet20 resnet110:resnet110"   teacher:student (crd: its 13)
#   DML_PAIRS="$PAIRS"                net1:net2 (DML_PAIRS="" runs none; crd: none)
#   SEEDS="2"              one full replicate per seed (the summary gives mean +- std)
#   EPOCHS=200             (crd: 240) another value shortens the schedule and adds
#                          -e<EPOCHS> to every run's name, so its runs stay apart
#   SCHEDULES=table        table: every run trains EPOCHS; authors (TABLE=crd): a KD run whose
#                          authors train its pair longer trains their schedule, named -e<its epochs>
#                          (MLKD: 480 or 960 epochs for five pairs; python -m kd_losses --own_epochs T S)
#   EXTRA_ARGS=""          appended to every command (e.g. "--no_download", "--device cpu")
#   KD_ARGS=""             appended to train_kd.py commands (e.g. "--init_epochs 5")
#   SHARE_TEACHER=1        the KD runs of one dataset, pair and seed share one process and one
#                          teacher pass (--kd_mode a,b,...; the same results); 0: a process each
#   STUDENTS_PER_RUN=all   with SHARE_TEACHER=1, the most students of one process
#   DRY_RUN=1              print the commands instead of running them (0/1, no/yes, false/true)
#   PYTHON=python
#   EXECUTOR=local         local (this machine) | slurm (job arrays through submitit)
# On a SLURM cluster (EXECUTOR=slurm; each job runs GPUS_PER_JOB x JOBS_PER_GPU runs):
#   PARTITION=""           the partition (unset: the cluster's default)
#   TIME_LIMIT=1440        one job's limit: minutes, H:MM:SS or D-HH; a job that reaches it resumes
#   GPUS_PER_JOB=1         0: CPU jobs
#   MAX_JOBS=64            jobs of one array running at once (--array=...%MAX_JOBS)
#   SBATCH_OPTIONS=""      more sbatch options (e.g. "--account=lab --qos=high --mem=16G")
# A run is finished when its complete.json exists: it is skipped. One with a
# checkpoint is resumed (--resume), one stopped before its first checkpoint
# starts again (--overwrite): an interrupted sweep continues. A KD or DML run
# whose baselines are not finished is not started (reported, the rest goes on).
# Failures are appended to RESULTS/logs/failed.txt, one dated block per sweep,
# and listed at the end (exit 1). INT/TERM stop every run the sweep started.
# `python sweep.py status RESULTS` lists what is queued, running, done and failed.
set -euo pipefail
set -o noglob  # lists such as $MODES are split into words, never expanded as file patterns
shopt -s inherit_errexit  # a failing command inside $(...) stops the script too
cd "$(dirname "$0")"

die() { echo "error: $*" >&2; exit 2; }

# ---- the settings, checked before anything starts (also in a dry run): sweep.py
# has their table. A bad value, or a variable that looks like a misspelt setting
# (MODE=st, EPOCH=2), stops the sweep with one line `error: ...`. It prints them
# resolved (unset: the default), with what the table reads from the code: the
# schedule's length, the runs' name tag and the networks' names.
PYTHON=${PYTHON-python}
[ -n "$PYTHON" ] || die "PYTHON is empty: unset it for python, or name one"
settings=$("$PYTHON" sweep.py check-settings) || {
    rc=$?
    (( rc != 2 )) || exit 2  # a bad setting: its one-line error is above
    die "$PYTHON cannot check the settings against the registries of modes, networks and datasets (its error is above)"
}
eval "$settings"  # TABLE DATA_ROOT RESULTS TEACHERS ... PYTHON EXECUTOR ... DEFAULT_EPOCHS TAG DOT_PAIRS ALL_NETWORKS SHAREABLE
read -r -a SEED_LIST <<< "$SEEDS"
read -r -a EXTRA <<< "$EXTRA_ARGS"
read -r -a KD_EXTRA <<< "$KD_ARGS"

# The schedule: every command gets --epochs (under the benchmark's protocol a
# shorter schedule keeps its lr decays at the same fractions of 150, 180, 210 of 240).
SCHEDULE=(--epochs "$EPOCHS")
SUFFIX=""
[ "$EPOCHS" = "$DEFAULT_EPOCHS" ] || SUFFIX="-e$EPOCHS"  # runs of another length stay apart
[ "$TABLE" = crd ] && SCHEDULE+=(--protocol crd)

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

# The pairs, and their networks as the TEACHER STUDENT words the registry's queries take
read -r -a PAIR_LIST <<< "$PAIRS"
PAIR_NETS=()
for pair in $PAIRS; do PAIR_NETS+=("${pair%%:*}" "${pair##*:}"); done

# ---- which modes apply to which pair (TABLE=crd: networks of other shapes; built, not trained)
declare -A APPLIES=() SKIPPED=()
if [ "$TABLE" = crd ] && [ -n "$MODES" ] && [ -n "$PAIRS" ] && [ -n "$SEEDS" ]; then
    for data in $DATASETS; do
        answer=$("$PYTHON" -m kd_losses --applies "${PAIR_NETS[@]}" --why --data_name "$data" --protocol crd) ||
            die "python -m kd_losses --applies failed (see above)"
        i=-1
        while IFS= read -r line; do
            if [[ $line == "# skipped: "* ]]; then  # "# skipped: MODE does not apply to T->S: why"
                mode=${line#"# skipped: "}
                SKIPPED["$data ${PAIR_LIST[i]} ${mode%% *}"]=$line
            else
                i=$((i + 1))
                APPLIES["$data ${PAIR_LIST[i]}"]=" $line "
            fi
        done <<< "$answer"
    done
fi

# ---- SCHEDULES=authors: the KD runs whose authors train their pair longer (OWN_EPOCHS["pair mode"])
declare -A OWN_EPOCHS=()
if [ "$SCHEDULES" = authors ] && [ -n "$MODES" ] && [ -n "$PAIRS" ]; then
    answer=$("$PYTHON" -m kd_losses --own_epochs "${PAIR_NETS[@]}" --protocol crd) ||
        die "python -m kd_losses --own_epochs failed (see above)"
    i=0
    while IFS= read -r line; do  # one line per pair: MODE:EPOCHS ...
        for own in $line; do OWN_EPOCHS["${PAIR_LIST[i]} ${own%%:*}"]=${own##*:}; done
        i=$((i + 1))
    done <<< "$answer"
fi

# ---- released teachers (TEACHERS=DIR): each teacher's file, found in either layout
declare -A TEACHER_FILE=()
if [ -n "$TEACHERS" ] && [ -n "$MODES" ] && [ -n "$SEEDS" ] && [ -n "$DATASETS" ]; then
    for pair in $PAIRS; do
        t=${pair%%:*}
        [ -n "${TEACHER_FILE[$t]-}" ] || TEACHER_FILE[$t]=$("$PYTHON" teachers.py find "$TEACHERS" "$t") || exit 2
    done
fi

# ---- the table, as steps for sweep.py, one line each (words quoted as bash quotes them):
run()   { printf '%q ' run "$@"; echo; }    # run DIR [--needs ROLE DIR]... -- COMMAND
check() { printf '%q ' check "$@"; echo; }  # check NAME -- COMMAND: passes before the runs that need it
note()  { printf '%q ' note "$1"; echo; }   # a line to print in its place
kd_run() {  # the KD run of modes "$@" (one: a run of its own; several: one process) for $data $t $s $seed;
            # a variant (VARIANT=st_dot VARIANT_FLAGS=(--optimizer dot)) goes to RESULTS/<variant>/
    local note dir modes t_model s_dir students=() teacher
    base_dir "$data" "$s"; s_dir=$BASE_DIR
    if [ -n "$TEACHERS" ]; then
        teacher=(--needs teacher "teacher-$t")
        t_model=${TEACHER_FILE[$t]}
    else
        base_dir "$data" "$t"
        teacher=(--needs teacher "$BASE_DIR")
        t_model="$BASE_DIR/model_best.pth.tar"
    fi
    run_id "$data" "$t" "$s"  # (after base_dir, which sets RUN_ID too)
    local schedule=("${SCHEDULE[@]}")
    if [ -n "$OWN_LENGTH" ]; then  # the authors' length for the pair: their schedule, not --epochs
        RUN_ID+="-e$OWN_LENGTH"
        schedule=(--protocol crd)
    fi
    if (( $# == 1 )); then
        note="${VARIANT:-$1}-$RUN_ID"; dir="$RESULTS/${VARIANT:-$1}"; modes=$1
    else
        note="kd-$RUN_ID"
        (( $# == ${#shared[@]} )) || note+="-$1"  # one process of several: named by its first mode
        dir="$RESULTS/shared"; modes=$(IFS=,; echo "$*")
        for mode in "$@"; do students+=(--student "$dir/$note/$mode"); done
    fi
    run "$dir/$note" "${students[@]}" "${teacher[@]}" --needs "student baseline" "$s_dir" -- \
        "$PYTHON" -u train_kd.py --data_name "$data" \
        --t_name "$t" --s_name "$s" --kd_mode "$modes" \
        --t_model "$t_model" --s_init "$s_dir/${INITIAL[$s]}" \
        --img_root "$DATA_ROOT" --save_root "$dir" --note "$note" \
        "${schedule[@]}" --seed "$seed" "${VARIANT_FLAGS[@]}" "${KD_EXTRA[@]}" "${EXTRA[@]}"
}
VARIANT=""
OWN_LENGTH=""
VARIANT_FLAGS=()
table() {
    # 1. baselines: every network a pair or DML uses (with TEACHERS, the teachers come released)
    local nets
    if [ -n "$TEACHERS" ]; then
        nets=$(for p in $PAIRS; do echo "${p##*:}"; done; for p in $DML_PAIRS; do echo "${p%%:*}"; echo "${p##*:}"; done)
    else
        nets=$(for p in $PAIRS $DML_PAIRS; do echo "${p%%:*}"; echo "${p##*:}"; done)
    fi
    for seed in $SEEDS; do
        for data in $DATASETS; do
            for net in $(sort -u <<< "$nets"); do
                base_dir "$data" "$net"
                run "$BASE_DIR" -- "$PYTHON" -u train_base.py --data_name "$data" --net_name "$net" \
                    --img_root "$DATA_ROOT" --save_root "$RESULTS/base" --note "${BASE_DIR##*/}" \
                    "${SCHEDULE[@]}" --seed "$seed" "${EXTRA[@]}"
            done
        done
    done

    # released teachers: each checked once (identified, hashed, its accuracy measured) before it teaches
    for t in "${!TEACHER_FILE[@]}"; do
        check "teacher-$t" -- "$PYTHON" teachers.py verify "$TEACHERS" "$t" --img_root "$DATA_ROOT"
    done

    # 2. every KD mode for every teacher -> student pair; with SHARE_TEACHER=1 the
    #    modes that can share one teacher pass train together (train_kd.py --kd_mode
    #    a,b,...), STUDENTS_PER_RUN at most per process, each student in its own run
    #    directory RESULTS/shared/kd-<run id>[-<first mode>]/<mode>/
    for seed in $SEEDS; do
        for data in $DATASETS; do
            for pair in $PAIRS; do
                t=${pair%%:*}
                s=${pair##*:}
                if [ "$TABLE" = crd ] && [ "$seed" = "${SEED_LIST[0]}" ]; then
                    for mode in $MODES; do  # each skipped mode once, with the reason
                        [ -z "${SKIPPED["$data $pair $mode"]-}" ] || note "${SKIPPED["$data $pair $mode"]}"
                    done
                fi
                shared=()
                for mode in $MODES; do
                    [ "$TABLE" != crd ] || [[ ${APPLIES["$data ${pair}"]-} == *" $mode "* ]] || continue
                    if [ -n "${OWN_EPOCHS["$pair $mode"]-}" ]; then  # a length of its own: alone
                        OWN_LENGTH=${OWN_EPOCHS["$pair $mode"]}
                        kd_run "$mode"
                        OWN_LENGTH=""
                    elif [ "$SHARE_TEACHER" = 1 ] && [[ " $SHAREABLE " == *" $mode "* ]]; then
                        shared+=("$mode")  # trained below, several students on one teacher pass
                    else
                        kd_run "$mode"
                    fi
                done
                per_run=${#shared[@]}
                [ "$STUDENTS_PER_RUN" = all ] || per_run=$STUDENTS_PER_RUN
                for ((i = 0; i < ${#shared[@]}; i += per_run)); do
                    kd_run "${shared[@]:i:per_run}"
                done
                # KD with DOT (Zhao et al., ICCV 2023) where its authors run it (the table's DOT_PAIRS)
                if [[ " $MODES " == *" st "* && " $DOT_PAIRS " == *" $pair "* ]]; then
                    VARIANT=st_dot VARIANT_FLAGS=(--optimizer dot)
                    kd_run st
                    VARIANT="" VARIANT_FLAGS=()
                fi
            done
        done
    done

    # 3. DML for every pair (net2 starts afresh when both nets are one architecture)
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
                run "$RESULTS/dml/$note" --needs "net1 baseline" "$dir1" --needs "net2 baseline" "$dir2" -- \
                    "$PYTHON" -u train_dml.py --data_name "$data" \
                    --net1_name "$n1" --net2_name "$n2" --net1_init "$dir1/${INITIAL[$n1]}" \
                    --net2_init "$init2" --img_root "$DATA_ROOT" --save_root "$RESULTS/dml" \
                    --note "$note" "${SCHEDULE[@]}" --seed "$seed" "${EXTRA[@]}"
            done
        done
    done
    echo end
}

# ---- run it: sweep.py (the settings above pick the executor)
plan=$(table)
exec "$PYTHON" sweep.py run <<< "$plan"
