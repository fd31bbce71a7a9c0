#!/usr/bin/env bash
# Run QEMU 7.2's qemu-iotests against vstor's drop-in mode (`vstor qemu-img`, `vstor qemu-io`).
#
#   tests/iotests/run.sh [-f raw|qcow2]... [-j JOBS] [-I | -M] [-k] [-l] [TEST...]
#
#   -f FMT    image format to run (repeatable; default: raw and qcow2)
#   -I        use the system's qemu-io with vstor's qemu-img (isolates qemu-img's share)
#   -M        use the system's qemu-img with vstor's qemu-io (isolates qemu-io's share)
#   -j JOBS   tests in parallel (default 2)
#   -k        keep the scratch directory even when everything passed
#   -l        only list the candidate tests and exit
#   TEST...   test names (001, 013, …); default: the candidates found by grepping the tests
#
# The iotests are fetched (once, cached) by /work/shared/tools/get-qemu-iotests.sh, or taken from
# $QEMU_IOTESTS_DIR. Candidates are the bash tests that use only qemu-img and qemu-io on raw or
# qcow2 images: no VM ($QEMU, _launch_qemu), no NBD, blkdebug, json: filenames, LUKS, null-co,
# --image-opts/--object or external data files. QEMU_PROG, QEMU_NBD_PROG
# and QSD_PROG point at a stub that exits 0, so anything that still reaches for them fails loudly
# in its output diff rather than running a real QEMU.
#
# Prints one line per test and format (pass / fail / skip with check's reason), a summary, and
# the scratch directory (TEST_DIR, under /tmp) holding each failure's NNN.out.bad and NNN.diff.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
formats=()
jobs=2
keep=0
list_only=0
real_io=0
real_img=0
while getopts "f:j:IMkl" opt; do
    case $opt in
        I) real_io=1 ;;
        M) real_img=1 ;;
        f) formats+=("$OPTARG") ;;
        j) jobs=$OPTARG ;;
        k) keep=1 ;;
        l) list_only=1 ;;
        *) sed -n '2,15p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ ${#formats[@]} -eq 0 ] && formats=(raw qcow2)

fetch=${VSTOR_IOTESTS_FETCH:-/work/shared/tools/get-qemu-iotests.sh}
if [ -n "${QEMU_IOTESTS_DIR:-}" ]; then
    src=$QEMU_IOTESTS_DIR
elif [ -x "$fetch" ] || [ -f "$fetch" ]; then
    src=$(bash "$fetch" | tail -1)
else
    echo "run.sh: cannot fetch the qemu-iotests (no $fetch; set QEMU_IOTESTS_DIR)" >&2
    exit 77
fi
if [ ! -x "$src/check" ]; then
    echo "run.sh: no qemu-iotests at '$src'" >&2
    exit 77
fi

# What a candidate must not touch (lines naming _unsupported_imgopts only refuse options).
exclude='_launch_qemu|QEMU_PROG|\$QEMU |_send_qemu_cmd|blkdebug|blkverify|json:|nbd|NBD'
exclude+='|_require_drivers|luks|null-co|null-aio|vvfat|QSD|qsd|--image-opts|--object|quorum'
exclude+='|throttle|copy-on-read|_supported_proto +(nbd|ssh|nfs)|valgrind|data_file'

candidates() {
    local t name
    for t in "$src"/[0-9][0-9][0-9] "$src"/tests/*; do
        name=$(basename "$t")
        case $name in *.*) continue ;; esac
        head -1 "$t" | grep -q bash || continue
        grep -Eq '_supported_fmt.*(raw|qcow2 |qcow2$|generic)' "$t" || continue
        # Not grep -q: quitting early would break the pipe, and pipefail would call that a miss.
        grep -v _unsupported_imgopts "$t" | grep -E "$exclude" > /dev/null && continue
        echo "$name"
    done
}

if [ $# -gt 0 ]; then tests=("$@"); else mapfile -t tests < <(candidates); fi
if [ $list_only -eq 1 ]; then
    echo "${tests[*]}"
    exit 0
fi

work=$(mktemp -d /tmp/vstor-iotests.XXXXXX)
mkdir -p "$work/bin" "$work/src/tests"
# A private copy: check writes its timing cache beside the tests.
cp -a "$src" "$work/src/tests/qemu-iotests"
[ -d "$src/../../python" ] && cp -a "$src/../../python" "$work/src/python"
for prog in qemu-img qemu-io; do
    printf '#!/bin/sh\nexec deno run -A "%s/mod.ts" %s "$@"\n' "$repo" "$prog" > "$work/bin/$prog"
done
printf '#!/bin/sh\nexit 0\n' > "$work/bin/stub"
chmod +x "$work/bin/"*

export QEMU_IMG_PROG=$work/bin/qemu-img QEMU_IO_PROG=$work/bin/qemu-io
[ $real_io -eq 1 ] && QEMU_IO_PROG=$(command -v qemu-io)
[ $real_img -eq 1 ] && QEMU_IMG_PROG=$(command -v qemu-img)
export QEMU_PROG=$work/bin/stub QEMU_NBD_PROG=$work/bin/stub QSD_PROG=$work/bin/stub

pass=() fail=() skip=()
for fmt in "${formats[@]}"; do
    export TEST_DIR=$work/scratch-$fmt SOCK_DIR=$work/sock-$fmt
    mkdir -p "$TEST_DIR" "$SOCK_DIR"
    log=$work/check-$fmt.log
    (cd "$work/src/tests/qemu-iotests" && ./check -tap -j "$jobs" "-$fmt" "${tests[@]}") \
        > "$log" 2>&1 || true
    while read -r line; do
        case $line in
            "ok $fmt "*"# SKIP"*)
                t=${line#ok $fmt }; t=${t%% *}
                why=$(cat "$TEST_DIR/$t.notrun" "$TEST_DIR/$t/$t.notrun" 2>/dev/null | head -1 || true)
                echo "skip $fmt $t ${why:-}"
                skip+=("$fmt/$t") ;;
            "ok $fmt "*)
                t=${line#ok $fmt }
                echo "pass $fmt $t"
                pass+=("$fmt/$t") ;;
            "not ok $fmt "*)
                t=${line#not ok $fmt }
                bad=$(ls "$TEST_DIR/$t.out.bad" "$TEST_DIR/$t/$t.out.bad" 2>/dev/null | head -1 || true)
                ref=$work/src/tests/qemu-iotests/$t.out
                [ -f "$work/src/tests/qemu-iotests/tests/$t.out" ] &&
                    ref=$work/src/tests/qemu-iotests/tests/$t.out
                if [ -n "$bad" ]; then
                    diff -u "$ref" "$bad" > "$TEST_DIR/$t.diff" || true
                fi
                echo "FAIL $fmt $t (diff: $TEST_DIR/$t.diff)"
                fail+=("$fmt/$t") ;;
        esac
    done < <(grep -E '^(not )?ok ' "$log")
done

echo
echo "summary: ${#pass[@]} passed, ${#fail[@]} failed, ${#skip[@]} skipped" \
    "(${#tests[@]} tests x ${#formats[@]} formats)"
[ ${#fail[@]} -gt 0 ] && echo "failed: ${fail[*]}"
if [ ${#fail[@]} -eq 0 ] && [ $keep -eq 0 ]; then
    rm -rf "$work"
else
    echo "scratch: $work"
fi
[ ${#fail[@]} -eq 0 ]
