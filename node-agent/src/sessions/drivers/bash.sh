# Kowalski Exo session driver for bash: runs the cells the node agent sends over the channel (a
# socket at the descriptor given as the first argument) in one shell, so variables, functions
# and the working directory persist; `llm_query PROMPT` asks the session's default model and
# `rlm_query PROMPT [CONTEXT]` starts a child run. Frames as in the Python driver: a header line
# "KIND ID LENGTH\n", then LENGTH bytes of payload.
__kx_fd=$1
__kx_max=$2

__kx_send() { # KIND ID PAYLOAD
  local LC_ALL=C
  printf '%s %s %s\n%s' "$1" "$2" "${#3}" "$3" >&"$__kx_fd"
}

__kx_read() { # sets __kx_kind, __kx_id, __kx_payload
  local LC_ALL=C __kx_len
  IFS=' ' read -r __kx_kind __kx_id __kx_len <&"$__kx_fd" || return 1
  __kx_payload=
  if [ "$__kx_len" -gt 0 ]; then
    IFS= read -r -d '' -N "$__kx_len" __kx_payload <&"$__kx_fd"
  fi
  return 0
}

# llm_query PROMPT: prints the default model's answer ("Error: ..." when it failed).
llm_query() {
  __kx_ask llm_query ask "$1"
}

# rlm_query PROMPT [CONTEXT]: prints the final answer of a child run over CONTEXT (text).
rlm_query() {
  local LC_ALL=C __kx_call
  # The prompt's length in bytes on a line of its own, then the prompt, then the context.
  printf -v __kx_call '%s\n%s%s' "${#1}" "$1" "${2-}"
  __kx_ask rlm_query recurse "$__kx_call"
}

__kx_ask() { # NAME KIND PAYLOAD
  local LC_ALL=C
  if [ "${#3}" -gt "$__kx_max" ]; then
    echo "$1: the call takes ${#3} bytes, over the session's limit of $__kx_max" >&2
    return 2
  fi
  # Unique even from subshells ($(llm_query ...)), which do not share a counter.
  local __kx_want="$BASHPID$RANDOM"
  __kx_send "$2" "$__kx_want" "$3"
  # Answers to earlier calls that were interrupted may still arrive: skip them.
  while __kx_read; do
    if [ "$__kx_kind" = result ] && [ "$__kx_id" = "$__kx_want" ]; then
      printf '%s\n' "$__kx_payload"
      return 0
    fi
  done
  return 1
}

__kx_cell() {
  trap 'trap - INT; return 130' INT
  eval "$1"
}

trap ':' INT
__kx_send ready 0 "{\"version\":\"${BASH_VERSION%%(*}\"}"
while __kx_read; do
  [ "$__kx_kind" = exec ] || continue
  # The cell's own llm_query calls read frames too: keep which cell this is.
  __kx_cell_id=$__kx_id
  __kx_cell "$__kx_payload"
  __kx_status=$?
  trap ':' INT
  __kx_send done "$__kx_cell_id" "{\"status\":\"exit\",\"exit_code\":$__kx_status}"
done
