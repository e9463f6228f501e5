#!/usr/bin/env bash
# Run train.py, or torchrun train.py, and restart it after a crash: a multi-day run goes on
# through a driver crash, the OOM killer or a lost node while nobody watches.
#
# train.py's exit codes (training/stopping.py, README "Reliability"): 0 finished or stopped on
# request; 2 do not restart (a config error, an incompatible checkpoint, the non-finite limit,
# a full disk); anything else a crash, which this script restarts from RUN_DIR/last.pt after an
# exponentially growing wait. It gives up after --max-crashes crashes within --window-min
# minutes without a new checkpoint. Each restart and the end are lines of the run's train.log
# (doc/log_format.md), which monitor_training.sh posts.
set -uo pipefail

usage() {
  cat <<EOF
usage: run_training.sh [options] [--] TRAIN_PY_ARGS...

Run "python train.py TRAIN_PY_ARGS" (or torchrun with --torchrun) and restart it after a crash.
--resume and --init are passed to the first start only: once the run has written a new
last.pt, restarts resume from it. SIGTERM, SIGINT (Ctrl-C) and SIGHUP are passed on to
train.py, which stops after its current update and writes last.pt; nothing is restarted then.

options:
  --torchrun="ARGS"    run "python -m torch.distributed.run ARGS train.py ...", e.g.
                       --torchrun="--nproc_per_node 4 --standalone" (one job: a failed rank
                       ends every rank, and the whole job is restarted)
  --max-crashes N      give up after N crashes ...                          (default $max_crashes)
  --window-min M       ... within M minutes without a new checkpoint        (default $window_min)
  --backoff S          wait S seconds before the first restart, doubling    (default $backoff_s)
  --max-backoff S      the longest wait                                     (default $max_backoff_s)
  --python PY          the interpreter                        (default \$PYTHON or python)
  -h, --help           this text

exit status: train.py's last one (0 finished or stopped, 2 refused); after giving up, the last
crash's.
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
entry=${HIFI_TSE_TRAIN_PY:-$here/train.py}  # tests run a stand-in
torchrun_args=""
max_crashes=5
window_min=30
backoff_s=10
max_backoff_s=600

die() { printf 'run_training.sh: %s\n' "$1" >&2; exit 2; }
need_number() { [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$1 needs a number, got '$2'"; }

while (($#)); do
  case $1 in
    --torchrun) (($# >= 2)) || die "--torchrun needs its arguments"; torchrun_args=$2; shift 2 ;;
    --torchrun=*) torchrun_args=${1#--torchrun=}; shift ;;
    --max-crashes | --window-min | --backoff | --max-backoff)
      (($# >= 2)) || die "$1 needs a value"
      need_number "$1" "$2"
      case $1 in
        --max-crashes) max_crashes=$2 ;;
        --window-min) window_min=$2 ;;
        --backoff) backoff_s=$2 ;;
        --max-backoff) max_backoff_s=$2 ;;
      esac
      shift 2 ;;
    --python) (($# >= 2)) || die "--python needs a value"; python=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
(($#)) || { usage >&2; exit 2; }
train_args=("$@")
[[ $max_crashes =~ ^[1-9][0-9]*$ ]] || die "--max-crashes must be a whole number >= 1"

# The run's folder, from the same config (a config error ends here, with train.py's message).
run_dir=$("$python" "$entry" "${train_args[@]}" --print-run-dir) || exit $?
run_dir=${run_dir##*$'\n'}
[[ -n $run_dir ]] || die "train.py --print-run-dir printed nothing"

log_line() {  # LEVEL EVENT: a train.log line in train.py's format, also on the console
  local line
  line="$(date '+%Y-%m-%d %H:%M:%S,%3N') $1 $2"
  mkdir -p "$run_dir"
  printf '%s\n' "$line" >>"$run_dir/train.log"
  printf '%s\n' "$line" >&2
}

ckpt_stamp() {  # identity of RUN_DIR/last.pt: a new checkpoint is a new file (atomic rename)
  stat -c '%i %.9Y' "$run_dir/last.pt" 2>/dev/null || echo none
}

last_step() {  # the step of the newest step_*.pt (zero-padded names sort by step), or none
  local files=("$run_dir"/step_*.pt) name
  [[ -e ${files[-1]} ]] || { echo none; return; }
  name=${files[-1]##*/step_}
  name=${name%.pt}
  echo $((10#$name))
}

without_start_flags() {  # train_args without --resume/--init and their values, into args
  local skip=0 a
  args=()
  for a in "${train_args[@]}"; do
    if ((skip)); then skip=0; continue; fi
    case $a in
      --resume | --init) skip=1 ;;
      --resume=* | --init=*) ;;
      *) args+=("$a") ;;
    esac
  done
}

# Under torchrun the launcher exits 1 for any failed worker; a refusing train.py records its
# code here as well (training/stopping.py).
exit_file=$(mktemp "${TMPDIR:-/tmp}/hifi_tse_exit.XXXXXX") || die "cannot create a temporary file"
trap 'rm -f "$exit_file"' EXIT
export HIFI_TSE_EXIT_FILE=$exit_file

stopping=0 child=0
on_signal() {
  # Ctrl-C and a scheduler's SIGTERM usually reach train.py directly as well; train.py counts
  # copies that arrive within a second as one request, so passing it on is safe. A second
  # request a second or more later ends train.py at once.
  stopping=1
  if ((child)) && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null
  fi
}
trap on_signal TERM INT HUP

first_stamp=$(ckpt_stamp)  # a last.pt from before this script started is not this run's
seen_stamp=$first_stamp
restarts=0 delay=$backoff_s
crash_times=()
while :; do
  if [[ $(ckpt_stamp) != "$first_stamp" ]]; then
    without_start_flags
  else
    args=("${train_args[@]}")
  fi
  : >"$exit_file"
  if [[ -n $torchrun_args ]]; then
    # shellcheck disable=SC2086  # torchrun's arguments are words by design
    "$python" -m torch.distributed.run $torchrun_args "$entry" "${args[@]}" &
  else
    "$python" "$entry" "${args[@]}" &
  fi
  child=$!
  wait "$child"
  rc=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal interrupted the wait
    wait "$child"
    rc=$?
  done
  child=0

  if ((stopping)); then
    log_line INFO "supervisor stop reason=signal exit=$rc last_step=$(last_step)"
    exit "$rc"
  fi
  if ((rc == 0)); then
    log_line INFO "supervisor stop reason=finished exit=0 last_step=$(last_step)"
    exit 0
  fi
  if ((rc == 2)) || [[ -s $exit_file ]]; then
    log_line ERROR "supervisor stop reason=do_not_restart exit=$rc last_step=$(last_step)"
    exit 2
  fi

  # A crash. Only crashes since the newest checkpoint count, and only within the window.
  now=$(date +%s)
  stamp=$(ckpt_stamp)
  if [[ $stamp != "$seen_stamp" ]]; then
    seen_stamp=$stamp crash_times=() delay=$backoff_s
  fi
  recent=()
  for t in "${crash_times[@]}" "$now"; do
    if awk -v t="$t" -v now="$now" -v m="$window_min" 'BEGIN { exit !(now - t <= 60 * m) }'
    then recent+=("$t"); fi
  done
  crash_times=("${recent[@]}")
  if ((${#crash_times[@]} >= max_crashes)); then
    log_line ERROR "supervisor stop reason=crash_loop crashes=${#crash_times[@]} window_min=$window_min exit=$rc last_step=$(last_step)"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  log_line WARNING "restart n=$restarts after exit=$rc last_step=$(last_step) wait_s=$delay"
  sleep "$delay" &
  wait $!
  kill $! 2>/dev/null  # the wait ended early on a signal
  if ((stopping)); then
    log_line INFO "supervisor stop reason=signal exit=$rc last_step=$(last_step)"
    exit "$rc"
  fi
  delay=$(awk -v d="$delay" -v m="$max_backoff_s" 'BEGIN { d *= 2; print (d > m ? m : d) }')
done
