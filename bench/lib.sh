# The harness the conversion benchmarks share (sourced by bench/convert_*.sh, not run alone):
# each case runs PAIRS alternating pairs of a durable copy of the case's input files (cp + sync, the
# floor for moving those bytes) and the conversion, every run from the same state (nothing dirty,
# the page cache dropped where allowed, then only the case's inputs read back in), and adds a row
# of both sides' minimum, median and maximum, the ratios of medians and of minimums, and
# dreambridge's peak RSS. dreambridge fsyncs every file before the atomic rename of its output, so
# both sides end with the bytes on disk.
#
# The sourcing script sets DB (the binary), TMP (a scratch folder it deletes), PAIRS, and may set
#   CASES    a grep pattern over the case labels to run (default: all)
#   PROFILE  1: run the conversions with DREAMBRIDGE_PROFILE=1 and show the median run's phases
#   RSS_OF   what peak RSS is a share of: "input" (the case's input bytes, default) or "largest"
#            (its largest input file)

CASES=${CASES:-.}
PROFILE=${PROFILE:-0}
RSS_OF=${RSS_OF:-input}
ROWS=()

need_time() { # GNU time for wall seconds and peak RSS
    command -v /usr/bin/time > /dev/null || { apt-get update -qq && apt-get install -y -qq time > /dev/null; }
}

measure() { # command... -> "seconds max_rss_kb"; its stdout is dropped, its stderr goes to $TMP/err
    /usr/bin/time -f "%e %M" -o "$TMP/time" "$@" > /dev/null 2> "$TMP/err"
    cat "$TMP/time"
}

durable_copy() { # files... -> copies them into $TMP/copy (flattened names) and syncs each
    mkdir -p "$TMP/copy"
    for f in "$@"; do cp "$f" "$TMP/copy/$(echo "$f" | tr / _)"; done
    sync "$TMP"/copy/*
}

CAN_DROP=1
can_drop_caches() { # once, before the cases: without the right to drop caches, say so
    sync
    echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || { CAN_DROP=0; echo "note: cannot drop the page cache here; runs start from whatever it holds"; }
}

fresh_start() { # input files... : nothing dirty, page cache dropped, the inputs read back in
    sync
    if [ "$CAN_DROP" = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    cat "$@" > /dev/null
}

stats() { # seconds on stdin -> "min median max"
    sort -g | awk '{ v[NR] = $1 } END { printf "%s %s %s\n", v[1], v[int((NR + 1) / 2)], v[NR] }'
}

load_average() { cut -d' ' -f1-3 /proc/loadavg; }

run_case() { # label, output path, "input files", dreambridge convert args...
    local label=$1 out=$2 inputs=$3
    shift 3
    echo "$label" | grep -q -e "$CASES" || return 0
    local bytes ref
    bytes=$(stat -c %s $inputs | awk '{ s += $1 } END { print s }')
    ref=$bytes
    if [ "$RSS_OF" = largest ]; then ref=$(stat -c %s $inputs | sort -g | tail -1); fi
    : > "$TMP/cp.txt"
    : > "$TMP/db.txt"
    local i who s kb
    for i in $(seq "$PAIRS"); do
        for who in $( [ $((i % 2)) = 1 ] && echo "cp db" || echo "db cp"); do
            fresh_start $inputs
            if [ "$who" = cp ]; then
                export -f durable_copy
                measure bash -c 'TMP=$0; durable_copy "$@"' "$TMP" $inputs >> "$TMP/cp.txt"
                rm -rf "$TMP/copy"
            else
                if [ "$PROFILE" = 1 ]; then
                    read -r s kb < <(DREAMBRIDGE_PROFILE=1 measure $DB convert "$@" --out "$out")
                else
                    read -r s kb < <(measure $DB convert "$@" --out "$out")
                fi
                [ -e "$out" ] || { echo "$label: dreambridge wrote no $out:" >&2; cat "$TMP/err" >&2; exit 1; }
                echo "$s $kb $(grep '^profile:' "$TMP/err" | sed 's/^profile: //')" >> "$TMP/db.txt"
                rm -rf "$out"
            fi
        done
    done
    local c d dk prof
    read -r -a c < <(cut -d' ' -f1 "$TMP/cp.txt" | stats)
    read -r -a d < <(cut -d' ' -f1 "$TMP/db.txt" | stats)
    dk=$(cut -d' ' -f2 "$TMP/db.txt" | sort -g | tail -1)
    ROWS+=("$(awk -v l="$label" -v b="$bytes" -v c0="${c[0]}" -v c1="${c[1]}" -v c2="${c[2]}" -v d0="${d[0]}" -v d1="${d[1]}" -v d2="${d[2]}" -v dk="$dk" -v ref="$ref" 'BEGIN {
        printf "%-36s %6.2f %5.2f %6.2f %6.2f %7.2f %6.2f %6.2f %7.2f %7.2f %7.0f %5.1f%%", l, b / 1e9, c0, c1, c2, d0, d1, d2, d1 / c1, d0 / c0, dk / 1024, 100 * dk * 1024 / ref
    }')")
    ROWS+=("$(printf '%-36s cp: %s  dreambridge: %s' '' "$(cut -d' ' -f1 "$TMP/cp.txt" | tr '\n' ' ')" "$(cut -d' ' -f1 "$TMP/db.txt" | tr '\n' ' ')")")
    if [ "$PROFILE" = 1 ]; then
        prof=$(awk -v m="${d[1]}" '$1 == m { $1 = ""; $2 = ""; print; exit }' "$TMP/db.txt")
        ROWS+=("$(printf '%-36s profile:%s' '' "$prof")")
    fi
}

print_rows() { # the table of every case run
    local of=input
    [ "$RSS_OF" = largest ] && of=largest
    printf "\n%-36s %6s %20s %22s %15s %7s %6s\n" "$PAIRS alternating pairs" "GB in" "cp + sync (s)" "dreambridge (s)" "ratio of" "peak" "of"
    printf "%-36s %6s %5s %6s %6s %7s %6s %6s %7s %7s %7s %6s\n" "" "" "min" "median" "max" "min" "median" "max" "medians" "minimums" "RSS MB" "$of"
    local r
    for r in "${ROWS[@]}"; do echo "$r"; done
}
