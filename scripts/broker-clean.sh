#!/usr/bin/env bash
# Deletes the queues that earlier test runs left on a local broker node:
# names the test kit made (`prefix.<pid>.<millis>.<n>`, and the `.dlq`, `-dl`
# and tier queues derived from them) and `backstop bench` made
# (`backstop.bench[.<kind>].<pid>`) whose test process no longer runs. Every run leaves
# some (a test that fails, or one whose queues outlive it on purpose); left
# alone they pile up, and a node recovering more queues than it has file
# handles does not finish booting (a CI run waited 30 minutes on 984 of them).
# Queues of a test process that still runs (a second suite beside this one)
# are kept. Meant for the local test broker scripts/test starts: a queue of
# another application named like `name.<number>.<number>.<number>` would be
# taken for a test's.
#
#   scripts/broker-clean.sh [NODE]     default: the node rabbitmqctl names
set -euo pipefail

log() { printf 'broker-clean: %s\n' "$*" >&2; }

node_args=()
[ -n "${1:-}" ] && node_args=(-n "$1")

names=$(timeout 120 rabbitmqctl -q "${node_args[@]}" list_queues name --no-table-headers) || {
  log "cannot list the queues of ${1:-the local node}; nothing deleted"
  exit 1
}
stale=$(mktemp)
chmod 644 "$stale"
trap 'rm -f "$stale"' EXIT
while IFS= read -r name; do
  pid=
  # The last three numbers are <pid>.<millis>.<n> (a prefix may hold
  # numbers of its own, as torture's `torture.<seed>` does); a suffix starts
  # with a letter (`.dlq`, `-dl`, `.retry.200ms`, `.store`).
  if [[ $name =~ ^.+\.([0-9]+)\.[0-9]+\.[0-9]+([.-][A-Za-z][A-Za-z0-9_.-]*)?$ ]]; then
    pid=${BASH_REMATCH[1]}
  elif [[ $name =~ ^backstop\.bench\.([a-z-]+\.)?([0-9]+)(\..*)?$ ]]; then
    # `backstop bench`'s queues: backstop.bench[.<kind>].<pid>
    pid=${BASH_REMATCH[2]}
  fi
  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    printf '%s\n' "$name" >>"$stale"
  fi
done <<<"$names"
count=$(wc -l <"$stale")
if [ "$count" -eq 0 ]; then
  exit 0
fi
# One call for all of them (one rabbitmqctl per queue takes a second each).
deleted=$(timeout 300 rabbitmqctl -q "${node_args[@]}" eval "
  {ok, B} = file:read_file(\"$stale\"),
  Names = [N || N <- binary:split(B, <<\"\\n\">>, [global]), N =/= <<>>],
  lists:foldl(fun(N, Acc) ->
      case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, N)) of
        {ok, Q} ->
          case catch rabbit_amqqueue:delete(Q, false, false, <<\"backstop-tests\">>) of
            {ok, _} -> Acc + 1;
            _ -> Acc
          end;
        _ -> Acc
      end
    end, 0, Names).") || {
  log "deleting the $count queues left by earlier test runs failed"
  exit 1
}
log "deleted $deleted queues left by earlier test runs on ${1:-the local node}"
