#!/usr/bin/env bash
# hypothesis-seeds.sh N CMD ARGS...: run CMD N times, each with a new random
# --hypothesis-seed, printing each seed; stop at the first failure and name its seed.
set -euo pipefail
runs="$1"
shift
for run in $(seq "$runs"); do
    seed="$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
    echo "hypothesis-seeds: run $run of $runs, --hypothesis-seed=$seed"
    if ! "$@" --hypothesis-seed="$seed"; then
        echo "hypothesis-seeds: failed with --hypothesis-seed=$seed (replay it with" \
             "THROTTLE_HYPOTHESIS_PROFILE=deep pytest ... --hypothesis-seed=$seed)" >&2
        exit 1
    fi
done
echo "hypothesis-seeds: $runs seeds passed"
