# shellcheck shell=bash
# build_tptrain.sh: the configure-and-build function that bench_vs_pytorch.sh and scaling.sh source.
#
# build_tptrain BUILD_DIR MESON_ARGS LOG: configures BUILD_DIR with MESON_ARGS when it has no
# build.ninja yet (adding -Dtests=false where Criterion is missing: the test suite needs it, the
# tool does not), then builds the tptrain target; all output goes to LOG. Returns 0 when
# BUILD_DIR/tptrain was built.
build_tptrain() {
    local dir=$1 args=$2 log=$3 extra=""
    {
        if [ ! -f "$dir/build.ninja" ]; then
            pkg-config --exists criterion 2>/dev/null || extra="-Dtests=false"
            # shellcheck disable=SC2086  # args is a list of options
            meson setup "$dir" $args $extra
        fi && ninja -C "$dir" tptrain
    } >"$log" 2>&1 && [ -x "$dir/tptrain" ]
}
