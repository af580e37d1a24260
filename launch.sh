#!/usr/bin/env bash
# Launch lipnext_scale/train.py on one node, across a SLURM allocation, or across a DeepSpeed hostfile.
# Run `./launch.sh --help` for the options.
set -euo pipefail

# Under sbatch the script runs from a spool copy: SLURM_SUBMIT_DIR is where it was submitted (from the
# repository root, or set LIPNEXT_ROOT).
ROOT=${LIPNEXT_ROOT:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)}
[[ -f $ROOT/lipnext_scale/train.py || -z ${SLURM_SUBMIT_DIR:-} ]] || ROOT=$SLURM_SUBMIT_DIR
PROG="${0##*/}"
TRAIN="lipnext_scale/train.py"
[[ $PWD == "$ROOT" ]] || TRAIN="$ROOT/$TRAIN"

usage() {
    cat <<EOF
Usage: $PROG [OPTIONS] RECIPE.yaml [OVERRIDE ...]

Launch lipnext_scale/train.py with one process per GPU. Options go before RECIPE; everything after
RECIPE (dotted overrides such as train.epochs=2, values with spaces included) is passed to train.py
verbatim. The command runs in the current directory, like train.py: relative paths (RECIPE,
--hostfile, run.output_dir) are relative to it; a RECIPE not found there is looked up in the repository
($ROOT).

As an sbatch script (the job's node list, CPUs and a job-unique port are taken from Slurm):
  sbatch --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 12 --requeue \
         --signal=B:USR1@120 launch.sh --nodes 2 --gpus 8 recipes/in1k_1b.yaml
SIGUSR1/SIGTERM/SIGINT are passed to the ranks, which finish their step, save a checkpoint and exit
with status 75; in a Slurm batch job this script then requeues the job (scontrol requeue), and the
requeued job resumes from that checkpoint.

Three setups, picked from the options:
  single node    (default)            deepspeed --num_gpus N ...   or, with --launcher torchrun,
                                      torchrun --standalone --nproc_per_node N ...
  SLURM          (--nodes M > 1, --nodelist or --slurm; run inside an allocation)
                                      one srun with one task per GPU, rendezvous on the first host
                                      of the node list; each task sets RANK=\$SLURM_PROCID,
                                      LOCAL_RANK=\$SLURM_LOCALID, WORLD_SIZE=\$SLURM_NTASKS
  hostfile       (--hostfile FILE)    deepspeed --hostfile FILE --num_nodes M --num_gpus N
                                      --master_addr FIRST_HOST --master_port PORT ...

Options:
  --gpus N            processes (GPUs) per node; required, a positive integer. Checked against the
                      GPUs visible on this node (nvidia-smi -L, and CUDA_VISIBLE_DEVICES if set) on
                      single-node runs, against SLURM_GPUS_ON_NODE in a SLURM run, and against every
                      host's slots=K in a hostfile run.
  --nodes M           number of nodes (default 1; in a SLURM run, the number of hosts in the node
                      list). Must match the SLURM allocation (SLURM_NNODES and the node list) or the
                      number of hosts in the hostfile.
  --launcher NAME     single-node launcher: deepspeed (default) or torchrun. SLURM runs always use
                      srun and hostfile runs always use deepspeed.
  --hostfile FILE     DeepSpeed hostfile: one 'HOST slots=K' per line; '#' comments and blank lines
                      are ignored. The first host is the rendezvous (--master_addr). deepspeed starts
                      the ranks over ssh (pdsh), in this directory, with the Python that runs deepspeed:
                      both must exist at the same paths on every host.
  --nodelist LIST     SLURM node list, e.g. 'node[01-02]' (default: \$SLURM_JOB_NODELIST). Giving it
                      selects a SLURM run and passes it on to srun. It is expanded with
                      'scontrol show hostnames' when scontrol is available, otherwise by this script,
                      which understands comma lists and bracket ranges/lists with zero padding
                      (gpu[01-03,07] -> gpu01 gpu02 gpu03 gpu07; a,b -> a b), so --dry-run also works
                      on a machine without SLURM.
  --slurm             SLURM run even with one node (srun with one task per GPU).
  --port P            rendezvous port, MASTER_PORT (default 29500; in a Slurm job 20000 + job id mod
                      20000, so that jobs sharing a node do not collide). On a single node outside
                      Slurm it is passed only when given (deepspeed --master_port P; torchrun then uses a
                      static rendezvous on 127.0.0.1:P instead of --standalone).
  --python EXE        Python interpreter that srun starts in a SLURM run (default: python).
  --cpu               run on CPUs (gloo): exports DS_ACCELERATOR=cpu to the launched processes and skips
                      the GPU checks; --gpus is then the number of CPU processes per node. Without it,
                      a machine with no GPU visible (no nvidia-smi) is refused. (In a
                      hostfile run deepspeed forwards only some variables to the hosts, DS_ACCELERATOR
                      not among them: list DS_ACCELERATOR=cpu in ~/.deepspeed_env on the host that runs
                      this script; hosts without GPUs pick the CPU accelerator by themselves.)
  --dry-run           print the exact commands that would run, one per line and shell-quoted so they
                      can be pasted into a shell, and exit 0 without running anything. Needs no GPU,
                      SLURM or deepspeed (skips the nvidia-smi check and the launcher lookup).
  -h, --help          show this help and exit.

Errors (wrong option, missing recipe, --gpus not a positive integer, --nodes different from the
allocation or the hostfile, a hostfile host with fewer slots than --gpus, a malformed hostfile line,
more --gpus than visible GPUs) stop the script with exit code 2 and a message on stderr. Otherwise the
exit code is the launcher's.

Environment read: SLURM_JOB_NODELIST (or SLURM_NODELIST), SLURM_NNODES (or SLURM_JOB_NUM_NODES),
SLURM_GPUS_ON_NODE, SLURM_CPUS_PER_TASK (passed to srun, which no longer inherits it since Slurm 22.05),
SLURM_JOB_ID, CUDA_VISIBLE_DEVICES. With deepspeed on a single node and CUDA_VISIBLE_DEVICES set,
the first N listed GPUs are selected with --include localhost:IDS (deepspeed --num_gpus would ignore
CUDA_VISIBLE_DEVICES).

Examples:
  # one node, 8 GPUs, DeepSpeed launcher
  $PROG --gpus 8 recipes/in1k_1b.yaml
  # the same with torchrun, two overrides (one value with a space)
  $PROG --launcher torchrun --gpus 8 recipes/in1k_1b.yaml train.epochs=2 'run.output_dir=runs/my run'
  # two CPU processes (gloo), e.g. on a laptop
  $PROG --cpu --gpus 2 recipes/quickstart.yaml
  # inside 'salloc --nodes 2 --gpus-per-node 8' or an sbatch script: 16 ranks
  $PROG --nodes 2 --gpus 8 --port 29600 recipes/in1k_2b.yaml
  # show the srun command for a node list, on any machine
  $PROG --dry-run --nodelist 'node[01-02]' --gpus 8 recipes/in1k_2b.yaml
  # DeepSpeed hostfile (pdsh/ssh between hosts)
  $PROG --hostfile hosts.txt --gpus 8 recipes/in1k_1b.yaml
EOF
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 2
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

# Shell-quote one word so that a shell reads it back unchanged: safe words as they are, others in '...'.
quote() {
    local s=$1 q="'\\''"
    if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/$q}"
    fi
}

# Print a command as one shell-quoted line.
print_cmd() {
    local out="" word
    for word in "$@"; do
        out+="${out:+ }$(quote "$word")"
    done
    printf '%s\n' "$out"
}

is_posint() {
    [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0))
}

# Expand one node-list element such as gpu[01-03,07] (possibly with several bracket groups), one host
# per line. Zero padding follows the width of the range's first number.
expand_element() {
    local elem=$1 prefix rest inner suffix part lo hi width i
    if [[ $elem != *"["* && $elem != *"]"* ]]; then
        [[ -n $elem ]] || return 1
        printf '%s\n' "$elem"
        return 0
    fi
    prefix=${elem%%"["*}
    rest=${elem#*"["}
    [[ $rest == *"]"* && $prefix != *"]"* ]] || return 1
    inner=${rest%%"]"*}
    suffix=${rest#*"]"}
    [[ -n $inner ]] || return 1
    local -a parts
    IFS=, read -r -a parts <<<"$inner"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]}
            hi=${BASH_REMATCH[2]}
        elif [[ $part =~ ^[0-9]+$ ]]; then
            lo=$part
            hi=$part
        else
            return 1
        fi
        ((10#$lo <= 10#$hi)) || return 1
        width=${#lo}
        for ((i = 10#$lo; i <= 10#$hi; i++)); do
            expand_element "$(printf '%s%0*d%s' "$prefix" "$width" "$i" "$suffix")" || return 1
        done
    done
}

# Expand a SLURM node list (a,b,gpu[01-03,07]) in bash, one host per line.
expand_nodelist_bash() {
    local list=$1 elem="" depth=0 ch i
    for ((i = 0; i < ${#list}; i++)); do
        ch=${list:i:1}
        case $ch in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)) ;;
        esac
        ((depth >= 0 && depth <= 1)) || return 1
        if [[ $ch == , && $depth -eq 0 ]]; then
            expand_element "$elem" || return 1
            elem=""
        else
            elem+=$ch
        fi
    done
    ((depth == 0)) || return 1
    expand_element "$elem"
}

expand_nodelist() {
    local list=$1 out
    # scontrol can be installed without a configuration ("Could not establish a configuration source").
    if ! out=$(scontrol show hostnames "$list" 2>/dev/null); then
        out=$(expand_nodelist_bash "$list") || die "cannot expand the SLURM node list '$list'" \
            "(without a working scontrol this script expands comma lists and bracket ranges such as gpu[01-03,07])"
    fi
    [[ -n $out ]] || die "the SLURM node list '$list' holds no hosts"
    printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------------------
# Options

GPUS=""
GPUS_GIVEN=0
NODES=""
LAUNCHER=""
HOSTFILE=""
NODELIST=""
PORT=""
PYTHON_EXE="python"
SLURM=0
CPU=0
DRY_RUN=0
RECIPE=""

OWN_OPTIONS=(--gpus --nodes --launcher --hostfile --nodelist --slurm --port --python --cpu --dry-run --help -h)

need_value() { # option, number of remaining arguments, next argument
    (($2 >= 2)) || die "option $1 needs a value (see --help)"
    [[ $3 != --* ]] || die "option $1 needs a value, got '$3' (see --help)"
}

while (($# > 0)); do
    opt=$1
    value=""
    if [[ $opt == --*=* ]]; then
        value=${opt#*=}
        opt=${opt%%=*}
        case $opt in
            --gpus | --nodes | --launcher | --hostfile | --nodelist | --port | --python) ;;
            --slurm | --cpu | --dry-run | --help) die "option $opt takes no value" ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        set -- "$opt" "$value" "${@:2}"
    fi
    case $opt in
        -h | --help)
            usage
            exit 0
            ;;
        --gpus | --nodes | --launcher | --hostfile | --nodelist | --port | --python)
            need_value "$opt" "$#" "${2-}"
            case $opt in
                --gpus) GPUS=$2 GPUS_GIVEN=1 ;;
                --nodes) NODES=$2 ;;
                --launcher) LAUNCHER=$2 ;;
                --hostfile) HOSTFILE=$2 ;;
                --nodelist) NODELIST=$2 ;;
                --port) PORT=$2 ;;
                --python) PYTHON_EXE=$2 ;;
            esac
            shift 2
            ;;
        --slurm) SLURM=1 && shift ;;
        --cpu) CPU=1 && shift ;;
        --dry-run) DRY_RUN=1 && shift ;;
        --)
            shift
            (($# > 0)) || die "missing RECIPE after -- (see --help)"
            RECIPE=$1
            shift
            break
            ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *)
            RECIPE=$1
            shift
            break
            ;;
    esac
done
OVERRIDES=("$@")
# ${a[@]+"${a[@]}"} below: an empty array is "unbound" under set -u in bash < 4.4 (e.g. RHEL 7).

[[ -n $RECIPE ]] || die "missing RECIPE, e.g. $PROG --gpus 8 recipes/in1k_1b.yaml (see --help)"

# train.py takes only overrides (and --local_rank); one of our options after RECIPE is a misplaced option,
# which would otherwise start a real run that train.py then rejects.
for arg in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    for own in "${OWN_OPTIONS[@]}"; do
        if [[ $arg == "$own" || $arg == "$own="* ]]; then
            die "launcher option '$arg' after the recipe path: options must come before RECIPE" \
                "(everything after RECIPE is passed to train.py)"
        fi
    done
done

((GPUS_GIVEN == 1)) || die "missing --gpus N (processes per node; see --help)"
is_posint "$GPUS" || die "--gpus must be a positive integer, got '$GPUS'"
GPUS=$((10#$GPUS))
if [[ -n $NODES ]]; then
    is_posint "$NODES" || die "--nodes must be a positive integer, got '$NODES'"
    NODES=$((10#$NODES))
fi
if [[ -n $PORT ]]; then
    if [[ ! $PORT =~ ^[0-9]+$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
        die "--port must be an integer in 1..65535, got '$PORT'"
    fi
    PORT=$((10#$PORT))
fi
case $LAUNCHER in
    "" | deepspeed | torchrun) ;;
    *) die "--launcher must be deepspeed or torchrun, got '$LAUNCHER'" ;;
esac
[[ -n $PYTHON_EXE ]] || die "--python needs a non-empty interpreter"

if [[ -f $RECIPE ]]; then
    :
elif [[ $RECIPE != /* && -f $ROOT/$RECIPE ]]; then
    [[ $PWD == "$ROOT" ]] || RECIPE="$ROOT/$RECIPE"
else
    die "recipe not found: '$RECIPE'"
fi

# ---------------------------------------------------------------------------------------------------
# Mode and command

if [[ -n $HOSTFILE ]]; then
    MODE=hostfile
    [[ -z $NODELIST && $SLURM -eq 0 ]] || die "--hostfile cannot be combined with --nodelist or --slurm"
    [[ $LAUNCHER != torchrun ]] || die "--launcher torchrun cannot be used with --hostfile (deepspeed reads it)"
elif [[ -n $NODELIST || $SLURM -eq 1 || ${NODES:-1} -gt 1 ]]; then
    MODE=slurm
    [[ -z $LAUNCHER ]] || die "--launcher $LAUNCHER cannot be used in a SLURM run (srun starts one task per GPU)"
else
    MODE=single
fi
LAUNCHER=${LAUNCHER:-deepspeed}

ENV_PREFIX=()
((CPU == 0)) || ENV_PREFIX=(DS_ACCELERATOR=cpu)
if ((CPU == 0 && DRY_RUN == 0)) && ! command -v nvidia-smi >/dev/null 2>&1 &&
    [[ ! ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9] ]]; then
    die "--gpus $GPUS: no GPU is visible here (no nvidia-smi); pass --cpu to run $GPUS CPU processes per node"
fi
if [[ -z $PORT && ${SLURM_JOB_ID:-} =~ ^[0-9]+$ ]]; then
    PORT=$((20000 + SLURM_JOB_ID % 20000))
fi

CMD=()
case $MODE in
    single)
        alloc_nodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
        if [[ $alloc_nodes =~ ^[0-9]+$ ]] && ((alloc_nodes > 1)); then
            warn "running on this node only, although the SLURM allocation has $alloc_nodes nodes" \
                "(pass --nodes $alloc_nodes to use them all)"
        fi
        # GPUs visible here: nvidia-smi (not in a dry run) and CUDA_VISIBLE_DEVICES, when available.
        cvd_ids=()
        if ((CPU == 0)) && [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
            IFS=, read -r -a raw_ids <<<"${CUDA_VISIBLE_DEVICES}"
            for id in ${raw_ids[@]+"${raw_ids[@]}"}; do
                id=${id//[[:space:]]/}
                [[ -n $id && $id != -* ]] || break # CUDA stops at the first invalid entry
                cvd_ids+=("$id")
            done
        fi
        if ((CPU == 0 && DRY_RUN == 0)); then
            if command -v nvidia-smi >/dev/null 2>&1; then
                smi_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
                ((GPUS <= smi_gpus)) ||
                    die "--gpus $GPUS exceeds the $smi_gpus GPU(s) visible on this node (nvidia-smi -L)"
            fi
            if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
                ((GPUS <= ${#cvd_ids[@]})) ||
                    die "--gpus $GPUS exceeds the ${#cvd_ids[@]} GPU(s) in CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
            fi
        fi
        if [[ $LAUNCHER == deepspeed ]]; then
            CMD=(deepspeed)
            if ((CPU == 0)) && [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
                # deepspeed --num_gpus ignores CUDA_VISIBLE_DEVICES; select the listed GPUs explicitly.
                ((GPUS <= ${#cvd_ids[@]})) ||
                    die "--gpus $GPUS exceeds the ${#cvd_ids[@]} GPU(s) in CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
                include=$(IFS=,; printf '%s' "${cvd_ids[*]:0:GPUS}")
                [[ $include =~ ^[0-9,]+$ ]] ||
                    die "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' is not a list of GPU indices, which" \
                        "deepspeed --include needs; use indices or --launcher torchrun"
                CMD+=(--include "localhost:$include")
            else
                CMD+=(--num_gpus "$GPUS")
            fi
            [[ -z $PORT ]] || CMD+=(--master_port "$PORT")
        else
            CMD=(torchrun)
            if [[ -n $PORT ]]; then
                CMD+=(--nnodes 1 --master_addr 127.0.0.1 --master_port "$PORT")
            else
                CMD+=(--standalone)
            fi
            CMD+=(--nproc_per_node "$GPUS")
        fi
        CMD+=("$TRAIN" "$RECIPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
        ;;

    slurm)
        if [[ -n $NODELIST ]]; then
            list=$NODELIST
            list_from="--nodelist '$NODELIST'"
        elif [[ -n ${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} ]]; then
            list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
            list_var=SLURM_JOB_NODELIST
            [[ -n ${SLURM_JOB_NODELIST:-} ]] || list_var=SLURM_NODELIST
            list_from="the SLURM allocation's node list $list_var='$list'"
        else
            die "a SLURM run (--nodes ${NODES:-1}) needs a SLURM allocation (SLURM_JOB_NODELIST) or" \
                "--nodelist; for ssh-launched nodes use --hostfile"
        fi
        hosts_text=$(expand_nodelist "$list") # exits here (code 2) when the list cannot be expanded
        mapfile -t HOSTS <<<"$hosts_text"
        NODES=${NODES:-${#HOSTS[@]}}
        ((NODES == ${#HOSTS[@]})) ||
            die "--nodes $NODES does not match $list_from, which has ${#HOSTS[@]} host(s): ${HOSTS[*]}"
        if [[ -z $NODELIST ]]; then
            alloc_nodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
            if [[ -n $alloc_nodes ]]; then
                ((NODES == alloc_nodes)) ||
                    die "--nodes $NODES does not match the SLURM allocation: SLURM_NNODES=$alloc_nodes"
            fi
        fi
        if ((CPU == 0)) && [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
            ((GPUS <= SLURM_GPUS_ON_NODE)) ||
                die "--gpus $GPUS exceeds the allocation's SLURM_GPUS_ON_NODE=$SLURM_GPUS_ON_NODE"
        fi
        CMD=(env ${ENV_PREFIX[@]+"${ENV_PREFIX[@]}"} "MASTER_ADDR=${HOSTS[0]}" "MASTER_PORT=${PORT:-29500}")
        ENV_PREFIX=()
        CMD+=(srun "--nodes=$NODES" "--ntasks=$((NODES * GPUS))" "--ntasks-per-node=$GPUS")
        # Every task sees all of its node's GPUs and picks one by LOCAL_RANK (the trainer calls
        # torch.cuda.set_device(LOCAL_RANK)); --gpus-per-task=1 would leave it only device 0.
        ((CPU == 1)) || CMD+=("--gpus-per-node=$GPUS")
        [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || CMD+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
        [[ -z $NODELIST ]] || CMD+=("--nodelist=$NODELIST")
        CMD+=(--kill-on-bad-exit=1)
        # Single-quoted so that each task evaluates its own SLURM_PROCID/SLURM_LOCALID.
        # shellcheck disable=SC2016
        CMD+=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"')
        CMD+=(launch-task "$PYTHON_EXE" -u "$TRAIN" "$RECIPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
        ;;

    hostfile)
        [[ -f $HOSTFILE && -r $HOSTFILE ]] || die "hostfile not found or not readable: '$HOSTFILE'"
        HOSTS=()
        declare -A HOST_LINE=()
        lineno=0
        while IFS= read -r line || [[ -n $line ]]; do
            lineno=$((lineno + 1))
            stripped=${line%%#*}
            stripped=${stripped//$'\r'/}
            [[ -n ${stripped//[[:space:]]/} ]] || continue
            if [[ ! $stripped =~ ^[[:space:]]*([^[:space:]=]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]]; then
                die "hostfile $HOSTFILE line $lineno is malformed: '$line' (expected 'HOST slots=K')"
            fi
            host=${BASH_REMATCH[1]}
            slots=$((10#${BASH_REMATCH[2]}))
            [[ -z ${HOST_LINE[$host]:-} ]] ||
                die "hostfile $HOSTFILE line $lineno: host $host is already listed on line ${HOST_LINE[$host]}"
            HOST_LINE[$host]=$lineno
            ((slots >= GPUS)) ||
                die "hostfile $HOSTFILE line $lineno: host $host has slots=$slots, fewer than --gpus $GPUS"
            HOSTS+=("$host")
        done <"$HOSTFILE"
        ((${#HOSTS[@]} > 0)) || die "hostfile $HOSTFILE has no hosts (expected lines 'HOST slots=K')"
        NODES=${NODES:-${#HOSTS[@]}}
        ((NODES == ${#HOSTS[@]})) ||
            die "--nodes $NODES does not match hostfile $HOSTFILE, which has ${#HOSTS[@]} host(s): ${HOSTS[*]}"
        CMD=(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS"
            --master_addr "${HOSTS[0]}" --master_port "${PORT:-29500}"
            "$TRAIN" "$RECIPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
        ;;
esac

if ((${#ENV_PREFIX[@]} > 0)); then
    CMD=(env "${ENV_PREFIX[@]}" "${CMD[@]}")
fi

if ((DRY_RUN == 1)); then
    print_cmd cd "$PWD"
    print_cmd "${CMD[@]}"
    exit 0
fi

case $MODE in
    slurm) launcher_exe=srun ;;
    *) launcher_exe=$LAUNCHER ;;
esac
command -v "$launcher_exe" >/dev/null 2>&1 || die "'$launcher_exe' not found in PATH (needed for this $MODE run)"

printf '%s: running: %s\n' "$PROG" "$(print_cmd "${CMD[@]}")" >&2
[[ -n ${SLURM_JOB_ID:-} ]] || exec "${CMD[@]}"

# In a Slurm job: the launcher runs in the background so that this shell can pass on the signals sent
# to it alone (sbatch --signal=B:USR1@120), and requeue the job when the ranks stopped with a checkpoint.
"${CMD[@]}" &
child=$!
for sig in USR1 TERM INT; do
    # shellcheck disable=SC2064  # $sig and $child are meant to be expanded now
    trap "kill -$sig $child 2>/dev/null" "$sig"
done
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do # wait returned for a trapped signal; the launcher runs on
    status=0
    wait "$child" || status=$?
done
if ((status == 75)); then
    echo "$PROG: the run stopped with a complete checkpoint; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" || warn "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
fi
exit "$status"
