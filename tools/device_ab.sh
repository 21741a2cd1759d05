#!/usr/bin/env bash
# device_ab.sh: one source file in two versions, timed in the same device command.
#
#   git show REV:cuda/flash_attention_sm90.cu > ab/old.cu      # here (ab/ travels untracked)
#   AB_FILE=cuda/flash_attention_sm90.cu AB_OLD=ab/old.cu bash tools/device_ab.sh   # there
#
# Builds build-gpu as the tree has it (tptrain copied to /tmp/tptrain_new), then with AB_FILE
# replaced by AB_OLD (/tmp/tptrain_old; the tree's file is put back after), and runs
# `tptrain --bench attention AB_GRID` AB_ROUNDS times with each binary, alternating, so that the
# two versions see the same machine. Output under ${OUT:-/tmp/out}/ab.log.
set -u
out=${OUT:-/tmp/out}
build=${BUILD_DIR:-build-gpu}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
[ -f .device-deps/setup.sh ] && . .device-deps/setup.sh >"$out/ab_setup.log" 2>&1
: "${AB_FILE:?AB_FILE: the file to swap}" "${AB_OLD:?AB_OLD: its other version}"
{ [ -d "$build" ] || meson setup "$build" -Dgpu_arch="${GPU_ARCH:-90}"; } >"$out/ab_build.log" 2>&1
ninja -C "$build" tptrain >>"$out/ab_build.log" 2>&1 || { echo "build failed"; tail -20 "$out/ab_build.log"; exit 1; }
cp "$build/tptrain" /tmp/tptrain_new
cp "$AB_FILE" /tmp/ab_tree_version
cp "$AB_OLD" "$AB_FILE"
ninja -C "$build" tptrain >>"$out/ab_build.log" 2>&1
rc=$?
cp /tmp/ab_tree_version "$AB_FILE"
[ $rc = 0 ] || { echo "build of the other version failed"; tail -20 "$out/ab_build.log"; exit 1; }
cp "$build/tptrain" /tmp/tptrain_old
for r in $(seq "${AB_ROUNDS:-2}"); do
    for v in new old; do
        echo "== round $r: $v ($([ $v = new ] && echo "the tree's $AB_FILE" || echo "$AB_OLD"))"
        timeout 120 /tmp/tptrain_$v --bench attention ${AB_GRID:-} 2>&1 | grep -v "^#"
    done
done | tee "$out/ab.log"
