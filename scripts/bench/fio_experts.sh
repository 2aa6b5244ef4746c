#!/usr/bin/env bash
# Disk bandwidth reference for `flashmoe bench experts`: random reads of whole BS-byte blocks
# (BS = the packed model's expert stride, so one fio read = one expert read), aligned to BS, with
# QD reads in flight, with O_DIRECT and through the page cache.
#
#   scripts/bench/fio_experts.sh FILE[:FILE2:...] BS QD [RUNS]
#
# FILE: an expert file of a packed model (DIR/experts/layer_NNN.bin); with several (colon-
#   separated), run i reads file i mod n, so repeated cold runs do not re-read one file.
# BS:   bytes per read (the expert stride: `flashmoe bench experts` prints it; also
#       manifest.json experts[].stride).
# QD:   reads in flight. Two engines: psync with QD threads (what the expert store does: a pool of
#       QD threads issuing pread), and libaio with iodepth QD (direct only; one thread).
# RUNS: repeats per mode (default 5); min/median/max reported.
# MODES: see below (environment variable).
#
# Each job reads every BS block of its file exactly once, in random order (fio's random map, the
# QD threads splitting the file into disjoint slices), so buffered runs after dropping the page
# cache see no cache hits. Needs fio (apt-get install fio) and root for drop_caches (else it
# falls back to evicting the file with `dd iflag=nocache`-style fadvise via python3).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,20p' "$0"
    exit 2
fi
FILES="$1"
BS="$2"
QD="$3"
RUNS="${4:-5}"
command -v fio >/dev/null || { echo "fio not found: apt-get install -y fio" >&2; exit 1; }
IFS=: read -r -a LIST <<< "$FILES"

evict() {
    sync
    if ! (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null; then
        python3 - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
        echo "  (drop_caches refused: evicted $1 with posix_fadvise)" >&2
    fi
}

# Prints the aggregate read bandwidth of one fio run in GB/s (1e9 bytes/s).
run_fio() { # file engine direct
    local f="$1" engine="$2" direct="$3"
    local size blocks per_job jobs depth
    size=$(stat -c %s "$f")
    blocks=$((size / BS))
    if [ "$engine" = psync ]; then jobs=$QD; depth=1; else jobs=1; depth=$QD; fi
    per_job=$(( blocks / jobs ))
    if [ "$per_job" -lt 1 ]; then echo "file $f has fewer than $jobs blocks of $BS bytes" >&2; exit 1; fi
    fio --name=experts --filename="$f" --readonly --rw=randread --bs="$BS" --ioengine="$engine" \
        --iodepth="$depth" --numjobs="$jobs" --thread --group_reporting --direct="$direct" \
        --size=$((per_job * BS)) --offset_increment=$((per_job * BS)) --invalidate=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print("%.4f %d %d" % (j["bw_bytes"]/1e9, j["io_bytes"], j["runtime"]))'
}

summary() { # label values...
    local label="$1"; shift
    python3 - "$label" "$@" <<'PY'
import statistics, sys
label, v = sys.argv[1], sorted(float(x) for x in sys.argv[2:])
print(f"{label:<34} GB/s min/median/max {v[0]:.3f} / {statistics.median(v):.3f} / {v[-1]:.3f}  ({len(v)} runs)")
PY
}

echo "fio $(fio --version | sed 's/fio-//') | files ${#LIST[@]} | bs $BS | qd $QD | runs $RUNS | $(date -u +%Y-%m-%dT%H:%MZ) | $(uname -r)"
# MODES (env): which of "direct psync 1", "buffered psync 0", "direct libaio 1" to run, separated by
# commas (default: all three), e.g. MODES="direct psync 1" for interleaving with other runs.
IFS=, read -r -a MODE_LIST <<< "${MODES:-direct psync 1,buffered psync 0,direct libaio 1}"
for mode in "${MODE_LIST[@]}"; do
    set -- $mode
    label="$1 ($2, $QD in flight)"
    vals=()
    for ((i = 0; i < RUNS; i++)); do
        f="${LIST[$((i % ${#LIST[@]}))]}"
        evict "$f"
        read -r gbs bytes ms < <(run_fio "$f" "$2" "$3")
        echo "  $label run $((i + 1)): $gbs GB/s ($bytes bytes in $ms ms, $(basename "$f"))"
        vals+=("$gbs")
    done
    summary "$label" "${vals[@]}"
done
