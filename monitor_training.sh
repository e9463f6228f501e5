#!/usr/bin/env bash
# Follow a train.py log and post WeCom (企业微信) webhook messages about the run: validation
# results, new bests, non-finite losses, tracebacks / errors / out-of-memory (with the last log
# lines), stalls, the end of training (finished, or stopped on a signal) and the lines that
# run_training.sh adds (restarts after a crash, giving up). The log line format is
# doc/log_format.md.
#
# The webhook URL carries the bot's key, which lets anyone post to the group: it is never
# printed, logged, put on a command line (curl reads it from a config file on a pipe) nor passed
# on to child processes.
set -u -o pipefail
# Byte semantics for ${#s}, ${s:i:n} and [[:cntrl:]], whatever the user's locale: the 4096-byte
# WeCom limit is in bytes and JSON escaping works byte by byte (UTF-8 passes through).
export LC_ALL=C

PROG=${0##*/}
WECOM_MAX_BYTES=4096  # WeCom: markdown content is at most 4096 bytes of UTF-8
CONTEXT_LINE_MAX_BYTES=400  # a context line longer than this is cut (tqdm bars, huge reprs)
ALERT_MAX_WAIT_FACTOR=5  # an error alert waits at most this many --alert-delay for its context
# Longest single wait for a log line. Short because a signal that lands just before bash enters
# `read -t` does not interrupt it: the trap (and so the exit) waits for the read to time out.
IDLE_WAIT_MS=1000
CURL_MAX_TIME=20  # seconds per post attempt
CURL_CONNECT_TIMEOUT=10
MAX_RETRY_DELAY_MS=300000  # the doubling retry delay stops growing at 5 min
TAIL_MAX_UNCHANGED_STATS=5  # polls of an idle file before tail checks whether it was replaced

usage() {
  cat <<EOF
Usage: $PROG [options] LOGFILE

Follow a train.py log (RUN_DIR/train.log, or a console log that also holds tracebacks) from now
on and post WeCom markdown messages to the webhook in \$HIFI_TSE_WEBHOOK_URL or --webhook-file:
monitor started, validation results (rate-limited), new best, non-finite loss, Python
traceback / ERROR line / out of memory (with the last log lines), no new line for a while
(stall) and its end, training finished or stopped on a signal (then no stall alert until the
log goes on), and from run_training.sh: each restart of train.py (its exit status decoded,
the checkpoint step it resumes from) and its final stop when it gives up after a crash loop
or will not restart. The log may be deleted, recreated or replaced.
Without a webhook URL, or with --dry-run, messages are printed to stdout instead.

Options:
  --webhook-file FILE      read the webhook URL from the first line of FILE (chmod 600);
                           takes precedence over \$HIFI_TSE_WEBHOOK_URL
  --name NAME              run name in messages (default: the log's parent folder)
  --dry-run                print messages to stdout, post nothing
  --val-interval SEC       at most one validation message per SEC seconds (default 1800);
                           new-best messages are always sent
  --nonfinite-interval SEC at most one non-finite-loss message per SEC seconds (default 600);
                           the next one counts those held back
  --stall-minutes MIN      alert when no log line came for MIN minutes (default 30; fractions
                           allowed); one alert per stall, a note when lines come again
  --context-lines N        log lines sent with a traceback or error (default 15)
  --alert-delay SEC        wait until the log is quiet for SEC seconds before sending a
                           traceback or error, so that the whole traceback is in it (default 2)
  --max-tries N            attempts per message before giving up on it (default 5)
  --retry-delay SEC        delay before the first retry, doubled after each (default 2;
                           also \$HIFI_TSE_MONITOR_RETRY_DELAY)
  --poll SEC               how often tail checks the file (default 1)
  -h, --help               show this help

Stop it with Ctrl-C, SIGTERM or SIGHUP. Exit status: 0 when stopped, 1 if tail ends, 2 on bad usage.
EOF
}

die_usage() {
  printf '%s: %s\n' "$PROG" "$1" >&2
  printf "Try '%s --help'.\n" "$PROG" >&2
  exit 2
}

warn() { printf '%s: %s\n' "$PROG" "$1" >&2; }

# to_ms VALUE SCALE_MS: a non-negative decimal VALUE in units of SCALE_MS milliseconds -> REPLY ms
to_ms() {
  [[ $1 =~ ^([0-9]+)(\.([0-9]*))?$ ]] || return 1
  local int=${BASH_REMATCH[1]} frac="${BASH_REMATCH[3]}000000"
  REPLY=$(( (10#$int * 1000000 + 10#${frac:0:6}) * $2 / 1000000 ))
}

now_ms() { local us=${EPOCHREALTIME//[!0-9]/}; NOW=$((10#$us / 1000)); }

# human_duration MS -> REPLY, e.g. "2.5 s", "45 s", "30 min", "2 h 5 min"
human_duration() {
  local s=$(($1 / 1000))
  if ((s < 10)); then REPLY="$s.$(($1 % 1000 / 100)) s"
  elif ((s < 120)); then REPLY="$s s"
  elif ((s < 7200)); then REPLY="$((s / 60)) min"
  else REPLY="$((s / 3600)) h $((s % 3600 / 60)) min"
  fi
}

# ---------------------------------------------------------------------------------------------
# options
webhook_file="" run_name="" dry_run=0 log_file=""
val_interval=1800 nonfinite_interval=600 stall_minutes=30 context_lines=15 alert_delay=2
max_tries=5 retry_delay=${HIFI_TSE_MONITOR_RETRY_DELAY:-2} poll=1
declare -a positional=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --) shift; positional+=("$@"); break ;;
    --webhook-file | --name | --val-interval | --nonfinite-interval | --stall-minutes | \
      --context-lines | --alert-delay | --max-tries | --retry-delay | --poll)
      (($# >= 2)) || die_usage "option $1 needs a value" ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    -?*) die_usage "unknown option: $1" ;;
    *) positional+=("$1"); shift; continue ;;
  esac
  case $1 in
    --webhook-file) webhook_file=$2 ;;
    --name) run_name=$2 ;;
    --val-interval) val_interval=$2 ;;
    --nonfinite-interval) nonfinite_interval=$2 ;;
    --stall-minutes) stall_minutes=$2 ;;
    --context-lines) context_lines=$2 ;;
    --alert-delay) alert_delay=$2 ;;
    --max-tries) max_tries=$2 ;;
    --retry-delay) retry_delay=$2 ;;
    --poll) poll=$2 ;;
  esac
  shift 2
done
((${#positional[@]} == 1)) || die_usage "expected exactly one LOGFILE"
log_file=${positional[0]}

to_ms "$val_interval" 1000 || die_usage "--val-interval: not a number of seconds: $val_interval"
val_interval_ms=$REPLY
to_ms "$nonfinite_interval" 1000 || die_usage "--nonfinite-interval: not a number: $nonfinite_interval"
nonfinite_interval_ms=$REPLY
to_ms "$stall_minutes" 60000 || die_usage "--stall-minutes: not a number of minutes: $stall_minutes"
stall_ms=$REPLY
((stall_ms > 0)) || die_usage "--stall-minutes must be > 0"
to_ms "$alert_delay" 1000 || die_usage "--alert-delay: not a number of seconds: $alert_delay"
alert_delay_ms=$REPLY
to_ms "$retry_delay" 1000 || die_usage "--retry-delay: not a number of seconds: $retry_delay"
retry_delay_ms=$REPLY
if ! to_ms "$poll" 1000 || ((REPLY == 0)); then die_usage "--poll: not a positive number: $poll"; fi
[[ $context_lines =~ ^[0-9]+$ ]] || die_usage "--context-lines: not an integer: $context_lines"
[[ $max_tries =~ ^[1-9][0-9]*$ ]] || die_usage "--max-tries: not a positive integer: $max_tries"
context_lines=$((10#$context_lines))
max_tries=$((10#$max_tries))

# The URL is read into a variable that is never printed, and removed from the environment so
# that tail and curl do not inherit it.
webhook_url=${HIFI_TSE_WEBHOOK_URL:-}
unset HIFI_TSE_WEBHOOK_URL
if [[ -n $webhook_file ]]; then
  [[ -r $webhook_file ]] || die_usage "--webhook-file: cannot read $webhook_file"
  perms=$(stat -L -c %a -- "$webhook_file" 2>/dev/null) || perms=600
  if ((8#$perms & 8#077)); then
    warn "warning: $webhook_file is readable by others; run: chmod 600 $webhook_file"
  fi
  webhook_url=""
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line//[[:space:]]/}
    [[ -n $line && $line != \#* ]] && { webhook_url=$line; break; }
  done <"$webhook_file"
  unset line
  [[ -n $webhook_url ]] || die_usage "--webhook-file: no URL in $webhook_file"
fi
if ((!dry_run)); then
  if [[ -z $webhook_url ]]; then
    warn "no webhook URL (\$HIFI_TSE_WEBHOOK_URL or --webhook-file): printing messages instead"
    dry_run=1
  elif [[ ! $webhook_url =~ ^https?://[^[:space:]\"\\]+$ ]]; then
    die_usage "the webhook URL must look like https://... (not shown here)"
  elif ! command -v curl >/dev/null; then
    die_usage "curl is not installed"
  fi
fi
webhook_key=""
[[ $webhook_url =~ [?\&]key=([^\&]+) ]] && webhook_key=${BASH_REMATCH[1]}

if [[ -z $run_name ]]; then
  run_name=$(realpath -m -- "$log_file")
  run_name=${run_name%/*}
  run_name=${run_name##*/}
  [[ -n $run_name ]] || run_name=/
fi
host=${HOSTNAME:-$(uname -n)}

# ---------------------------------------------------------------------------------------------
# text helpers

# redact TEXT -> REPLY: TEXT without the webhook URL or key
redact() {
  REPLY=$1
  [[ -n $webhook_url ]] && REPLY=${REPLY//"$webhook_url"/"<webhook>"}
  [[ -n $webhook_key ]] && REPLY=${REPLY//"$webhook_key"/"<key>"}
}

# cut_bytes VAR MAX: cut the string in VAR to at most MAX bytes without splitting a UTF-8 char
cut_bytes() {
  local -n _str=$1
  local max=$2 i n b need
  ((${#_str} > max)) || return 0
  _str=${_str:0:max}
  n=${#_str}
  for ((i = n - 1; i >= 0 && i >= n - 4; i--)); do
    printf -v b '%d' "'${_str:i:1}"
    ((b < 0)) && b=$((b + 256))
    if ((b < 0x80)); then  # ASCII: everything up to here is whole
      _str=${_str:0:i+1}
      return 0
    elif ((b >= 0xC0)); then  # the lead byte of the last character
      need=1
      ((b >= 0xE0)) && need=2
      ((b >= 0xF0)) && need=3
      ((n - 1 - i < need)) && _str=${_str:0:i}
      return 0
    fi
  done
}

# json_escape TEXT -> REPLY: TEXT as the inside of a JSON string
json_escape() {
  local s=$1 c esc
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  while [[ $s =~ [[:cntrl:]] ]]; do
    c=${BASH_REMATCH[0]}
    printf -v esc '\\u%04x' "'$c"
    s=${s//"$c"/"$esc"}
  done
  REPLY=$s
}

# ---------------------------------------------------------------------------------------------
# posting

tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/monitor_training.XXXXXX") || { warn "mktemp failed"; exit 1; }
tail_pid="" child_pid=""

cleanup() {
  [[ -n $tail_pid ]] && kill "$tail_pid" 2>/dev/null
  [[ -n $child_pid ]] && kill "$child_pid" 2>/dev/null
  rm -rf -- "$tmp_dir"
}
on_signal() {
  trap - INT TERM HUP
  cleanup
  trap - EXIT
  exit 0
}
trap cleanup EXIT
trap on_signal INT TERM HUP

# pause MS: sleep that a signal interrupts at once
pause() {
  sleep "$(($1 / 1000)).$(printf '%03d' $(($1 % 1000)))" &
  child_pid=$!
  wait "$child_pid"
  child_pid=""
}

# post_once JSON: one attempt; on failure REPLY says why (without the URL)
post_once() {
  local rc code body
  # The URL goes to curl in a config file on a pipe: never in argv, never on disk.
  curl --silent --show-error --max-time "$CURL_MAX_TIME" --connect-timeout "$CURL_CONNECT_TIMEOUT" \
    --header 'Content-Type: application/json' --data-binary @- \
    --output "$tmp_dir/reply" --write-out '%{http_code}' \
    --config <(printf 'url = "%s"\n' "$webhook_url") \
    < <(printf '%s' "$1") >"$tmp_dir/code" 2>"$tmp_dir/err" &
  child_pid=$!
  wait "$child_pid"
  rc=$?
  child_pid=""
  code="" body=""
  [[ -f $tmp_dir/code ]] && code=$(<"$tmp_dir/code")
  [[ -f $tmp_dir/reply ]] && body=$(<"$tmp_dir/reply")
  rm -f -- "$tmp_dir/reply" "$tmp_dir/code"
  if ((rc != 0)); then
    REPLY=$(<"$tmp_dir/err")
    REPLY="curl exit status $rc${REPLY:+: ${REPLY//$'\n'/ }}"
    return 1
  fi
  if [[ ! $code =~ ^2 ]]; then
    REPLY="HTTP status $code"
    return 1
  fi
  if [[ $body =~ \"errcode\"[[:space:]]*:[[:space:]]*(-?[0-9]+) ]] && [[ ${BASH_REMATCH[1]} != 0 ]]; then
    REPLY="WeCom errcode ${BASH_REMATCH[1]}"
    [[ $body =~ \"errmsg\"[[:space:]]*:[[:space:]]*\"([^\"]*)\" ]] && REPLY+=": ${BASH_REMATCH[1]}"
    return 1
  fi
  return 0
}

# send CONTENT: post it (with retries), or print it in a dry run; never fails
send() {
  local content=$1 try delay_ms=$retry_delay_ms stamp
  cut_bytes content "$WECOM_MAX_BYTES"
  if ((dry_run)); then
    printf -v stamp '%(%Y-%m-%d %H:%M:%S)T' -1
    printf -- '----- %s message (dry run) -----\n%s\n\n' "$stamp" "$content"
    return 0
  fi
  json_escape "$content"
  local json="{\"msgtype\":\"markdown\",\"markdown\":{\"content\":\"$REPLY\"}}"
  for ((try = 1; try <= max_tries; try++)); do
    post_once "$json" && return 0
    redact "$REPLY"
    if ((try < max_tries)); then
      local why=$REPLY
      human_duration "$delay_ms"
      warn "post failed (attempt $try of $max_tries): $why; retrying in $REPLY"
      pause "$delay_ms"
      delay_ms=$((delay_ms * 2 > MAX_RETRY_DELAY_MS ? MAX_RETRY_DELAY_MS : delay_ms * 2))
    else
      warn "post failed (attempt $try of $max_tries): $REPLY; giving up on this message: ${content%%$'\n'*}"
    fi
  done
  return 0
}

# ---------------------------------------------------------------------------------------------
# run state and messages

step="?"
train_summary="" val_summary=""  # "train@N loss=... lr=..." / "val@N si_sdri=..." as last seen
declare -a context=()  # the last $context_lines log lines
declare -A kv=()
last_val_ms=-1 last_nonfinite_ms=-1 nonfinite_held=0
ended=0  # 1 after a line that ends the run, until the next line: no stall alert meanwhile

# parse_kv EVENT: its key=value words into kv
parse_kv() {
  local -a words
  local w
  kv=()
  read -r -a words <<<"$1"
  for w in "${words[@]}"; do
    [[ $w == ?*=* ]] && kv[${w%%=*}]=${w#*=}
  done
  [[ -n ${kv[step]:-} ]] && step=${kv[step]}
}

# summary PREFIX KEY...: "PREFIX key=value ..." for the keys present in kv -> REPLY
summary() {
  local k
  REPLY=$1
  shift
  for k; do
    [[ -n ${kv[$k]:-} ]] && REPLY+=" $k=${kv[$k]}"
  done
}

# exit_text STATUS -> REPLY: an exit status as text, "137 (killed by signal 9, SIGKILL)"; the
# shell reports a process killed by signal N as 128+N (N <= 64)
exit_text() {
  local sig name
  REPLY=$1
  if [[ ! $1 =~ ^[0-9]{1,3}$ ]] || ((10#$1 <= 128 || 10#$1 > 192)); then return 0; fi
  sig=$((10#$1 - 128))
  REPLY+=" (killed by signal $sig"
  name=$(kill -l "$sig" 2>/dev/null) && REPLY+=", SIG$name"
  REPLY+=")"
}

# checkpoint_text LAST_STEP -> REPLY: the supervisor's last_step= as text
checkpoint_text() {
  if [[ $1 == none ]]; then REPLY="no checkpoint yet"
  else REPLY="last checkpoint step ${1:-?}"
  fi
}

# message TITLE COLOR [DETAIL]: the common head of every message -> MSG
message() {
  MSG="<font color=\"$2\">**$1**</font>"$'\n'"run \`$run_name\` on \`$host\`, step $step"
  [[ -n $val_summary ]] && MSG+=$'\n'"> $val_summary"
  [[ -n $train_summary ]] && MSG+=$'\n'"> $train_summary"
  [[ -n ${3:-} ]] && MSG+=$'\n'"$3"
  return 0
}

# with_context: MSG plus the last log lines in a code block, oldest dropped to fit WeCom's limit
with_context() {
  local -a lines=("${context[@]}")
  local head="$MSG"$'\n'"last ${#lines[@]} log lines:"$'\n''```' body line
  while :; do
    body=""
    for line in "${lines[@]}"; do body+=$'\n'"$line"; done
    ((${#head} + ${#body} + 4 <= WECOM_MAX_BYTES || ${#lines[@]} <= 1)) && break
    lines=("${lines[@]:1}")
    head="$MSG"$'\n'"last ${#lines[@]} log lines:"$'\n''```'
  done
  MSG="$head$body"$'\n''```'
}

# Errors are held until the log is quiet for --alert-delay so the whole traceback goes out.
alert_kind="" alert_line="" alert_since_ms=0

add_alert() {  # KIND LINE: KIND is oom > traceback > error in importance
  local -A rank=([error]=1 [traceback]=2 [oom]=3)
  if [[ -z $alert_kind ]]; then
    alert_kind=$1 alert_line=$2 alert_since_ms=$NOW
  elif ((rank[$1] > rank[$alert_kind])); then
    alert_kind=$1
  fi
}

flush_alert() {
  [[ -n $alert_kind ]] || return 0
  local title detail="" reason
  case $alert_kind in
    oom) title="out of memory" ;;
    traceback) title="Python traceback" ;;
    *)
      title="error"
      if [[ $alert_line =~ \ ERROR\ stopping\  ]]; then
        parse_kv "${alert_line#* ERROR stopping }"
        reason=${kv[reason]:-unknown}
        title="training stopped: ${reason//_/ }"
      fi
      ;;
  esac
  message "$title" warning "$detail"
  with_context
  alert_kind=""
  send "$MSG"
}

on_event() {  # LEVEL EVENT: one documented train.py (or run_training.sh) line
  local level=$1 event=$2 first=${2%% *} loss reason title detail color
  case $first in
    *=*)  # a training step line
      parse_kv "$event"
      summary "train@$step" loss si_sdr lr
      train_summary=$REPLY
      loss=${kv[loss]:-0}
      if [[ ${loss,,} =~ ^[+-]?(nan|inf) ]]; then
        nonfinite "loss=$loss in the training log line"
      fi
      ;;
    val)
      parse_kv "${event#val}"
      summary "val@$step" si_sdr si_sdri ta_supp_db select_acc ref_sens loss
      val_summary=$REPLY
      now_ms
      if ((last_val_ms < 0 || NOW - last_val_ms >= val_interval_ms)); then
        last_val_ms=$NOW
        message "validation" comment
        send "$MSG"
      fi
      ;;
    best)
      parse_kv "${event#best}"
      message "new best: si_sdri=${kv[si_sdri]:-?} dB" info
      send "$MSG"
      ;;
    nonfinite)
      parse_kv "${event#nonfinite}"
      nonfinite "non-finite gradient, update skipped (count=${kv[count]:-?}, in a row=${kv[in_a_row]:-?})"
      ;;
    resumed)
      parse_kv "${event#resumed}"
      ;;
    training)
      if [[ $event == "training finished"* ]]; then
        parse_kv "${event#training finished}"
        ended=1
        reason=${kv[reason]:-}
        message "training finished${reason:+: ${reason//_/ }}" info \
          "best si_sdri=${kv[best_si_sdri]:-?} dB"
        send "$MSG"
      fi
      ;;
    stopped)  # train.py's last line after a graceful stop, e.g. on SIGTERM
      parse_kv "${event#stopped}"
      ended=1
      reason=${kv[reason]:-}
      if [[ $reason == signal ]]; then
        message "training stopped on ${kv[signal]:-a signal} at step $step" info "last.pt written"
      else
        message "training stopped${reason:+: ${reason//_/ }} at step $step" info
      fi
      send "$MSG"
      ;;
    restart)  # run_training.sh restarted train.py after it exited
      parse_kv "${event#restart}"
      exit_text "${kv[exit]:-?}"
      title="restart ${kv[n]:-?} after exit $REPLY"
      if [[ ${kv[last_step]:-} == none ]]; then
        detail="no checkpoint yet: starting from scratch"
      else
        detail="resuming from the checkpoint at step ${kv[last_step]:-?}"
      fi
      [[ -n ${kv[wait_s]:-} ]] && detail+=" (after waiting ${kv[wait_s]} s)"
      message "$title" warning "$detail"
      send "$MSG"
      ;;
    supervisor)  # run_training.sh's last line; at level ERROR it skips the error alert path
      if [[ $event != "supervisor stop" && $event != "supervisor stop "* ]]; then
        parse_kv "$event"
        return 0
      fi
      parse_kv "${event#supervisor stop}"
      ended=1
      reason=${kv[reason]:-unknown}
      checkpoint_text "${kv[last_step]:-}"
      detail=$REPLY
      exit_text "${kv[exit]:-?}"
      case $reason in
        finished) ;;  # train.py's own last line has been reported
        signal)  # with exit=0 train.py's stopped line has been reported
          if [[ ${kv[exit]:-0} != 0 ]]; then  # e.g. during the wait before a restart
            message "supervisor stopped on a signal; not restarted" info "last exit $REPLY; $detail"
            send "$MSG"
          fi
          ;;
        crash_loop)
          title="supervisor gave up: ${kv[crashes]:-?} crashes in ${kv[window_min]:-?} min"
          message "$title without a new checkpoint" warning "last exit $REPLY; $detail"
          send "$MSG"
          ;;
        do_not_restart)
          if [[ ${kv[exit]:-} == 2 ]]; then
            reason="a config error, an incompatible checkpoint, the non-finite limit or a full disk"
            message "train.py refused to run (exit 2); not restarted" warning \
              "exit 2: $reason; $detail"
          else
            message "train.py exit $REPLY; not restarted" warning "$detail"
          fi
          send "$MSG"
          ;;
        *)
          color=info
          [[ $level == INFO || $level == DEBUG ]] || color=warning
          message "supervisor stopped: ${reason//_/ }" "$color" "last exit $REPLY; $detail"
          send "$MSG"
          ;;
      esac
      ;;
    *)
      parse_kv "$event"
      ;;
  esac
}

nonfinite() {  # DETAIL: a non-finite-loss message, at most one per --nonfinite-interval
  now_ms
  if ((last_nonfinite_ms >= 0 && NOW - last_nonfinite_ms < nonfinite_interval_ms)); then
    nonfinite_held=$((nonfinite_held + 1))
    return 0
  fi
  local detail=$1
  ((nonfinite_held)) && detail+=" (+$nonfinite_held more since the last message)"
  last_nonfinite_ms=$NOW nonfinite_held=0
  message "non-finite loss" warning "$detail"
  send "$MSG"
}

# Not anchored: in a console log a tqdm bar may precede the log line on the same line.
log_line_re='(^|[^0-9])[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2},[0-9]{3} ([A-Z]+) (.*)$'
oom_re='CUDA out of memory|OutOfMemoryError|(^|[^[:alnum:]_])Killed([^[:alnum:]_]|$)'

on_line() {  # LINE
  local line=${1%$'\r'} short
  line=${line##*$'\r'}  # what a terminal shows of a line that tqdm redrew
  short=$line
  if ((${#short} > CONTEXT_LINE_MAX_BYTES)); then
    cut_bytes short "$CONTEXT_LINE_MAX_BYTES"
    short+=" [...]"
  fi
  short=${short//'```'/"'''"}
  local level="" event="" trigger=""
  if [[ $line =~ $log_line_re ]]; then
    level=${BASH_REMATCH[2]} event=${BASH_REMATCH[3]}
  fi
  if [[ $line =~ $oom_re ]]; then
    trigger=oom
  elif [[ $line == "Traceback (most recent call last):"* ]]; then
    trigger=traceback
  elif [[ ($level == ERROR || $level == CRITICAL) && ! $event =~ ^supervisor\ stop(\ |$) ]]; then
    # The supervisor's stop line is a message of its own (on_event), not an error alert: as an
    # ordinary line it sends the pending crash alert first instead of being dropped into it.
    trigger=error
  fi
  # A pending error goes out before the next ordinary log line: it ends the traceback.
  [[ -n $level && -z $trigger ]] && flush_alert
  if ((context_lines > 0)); then
    context+=("$short")
    ((${#context[@]} > context_lines)) && context=("${context[@]:1}")
  fi
  if [[ $trigger == oom ]]; then
    add_alert oom "$line"
  elif [[ $trigger == traceback ]]; then
    add_alert traceback "$line"
  elif [[ $trigger == error ]]; then
    [[ $event == *step=* ]] && parse_kv "$event"
    add_alert error "$line"
  elif [[ -n $event ]]; then
    on_event "$level" "$event"
  fi
}

# ---------------------------------------------------------------------------------------------
# follow the log

# Start at the current end of the file (all of it if it does not exist yet): unlike `-n 0` this
# cannot miss lines written while tail starts. Polling, not inotify: GNU tail's inotify mode
# misses a log deleted and recreated soon after it appeared. -F reopens a replaced file and
# reads it from its start.
size=$(stat -L -c %s -- "$log_file" 2>/dev/null) || size=0
[[ -e $log_file ]] || warn "$log_file does not exist yet; waiting for it"
exec 3< <(exec tail -c "+$((size + 1))" -F ---disable-inotify -s "$poll" \
  --max-unchanged-stats="$TAIL_MAX_UNCHANGED_STATS" -- "$log_file" 2>/dev/null)
tail_pid=$!

human_duration "$val_interval_ms"
val_every=$REPLY
human_duration "$stall_ms"
message "monitor started" comment \
  "following \`$log_file\`; validation messages at most every $val_every, stall alert after $REPLY"
send "$MSG"
now_ms
last_line_ms=$NOW stalled=0

partial=""
while :; do
  now_ms
  wait_ms=$IDLE_WAIT_MS
  ((!stalled && !ended && last_line_ms + stall_ms - NOW < wait_ms)) &&
    wait_ms=$((last_line_ms + stall_ms - NOW))
  if [[ -n $alert_kind ]]; then
    due=$((last_line_ms + alert_delay_ms))
    ((alert_since_ms + ALERT_MAX_WAIT_FACTOR * alert_delay_ms < due)) &&
      due=$((alert_since_ms + ALERT_MAX_WAIT_FACTOR * alert_delay_ms))
    ((due - NOW < wait_ms)) && wait_ms=$((due - NOW))
  fi
  ((wait_ms < 10)) && wait_ms=10
  line=""
  if IFS= read -r -t "$((wait_ms / 1000)).$(printf '%03d' $((wait_ms % 1000)))" -u 3 line; then
    line=$partial$line
    partial=""
    now_ms
    if ((stalled)); then
      stalled=0
      [[ $line =~ [[:space:]]step=([0-9]+) ]] && step=${BASH_REMATCH[1]}
      human_duration $((NOW - last_line_ms))
      message "log resumed" info "new lines after $REPLY of silence"
      send "$MSG"
      now_ms
    fi
    last_line_ms=$NOW ended=0
    on_line "$line"
  else
    rc=$?
    if ((rc <= 128)); then  # end of file: tail is gone
      partial=""
      flush_alert
      warn "tail stopped following $log_file; exiting"
      exit 1
    fi
    partial+=$line  # timed out in the middle of a line
  fi
  now_ms
  if [[ -n $alert_kind ]] && ((NOW - last_line_ms >= alert_delay_ms ||
    NOW - alert_since_ms >= ALERT_MAX_WAIT_FACTOR * alert_delay_ms)); then
    flush_alert
  fi
  if ((!stalled && !ended && NOW - last_line_ms >= stall_ms)); then
    stalled=1
    flush_alert
    human_duration $((NOW - last_line_ms))
    message "stalled: no new log line for $REPLY" warning
    send "$MSG"
  fi
done
