// test_convert.c: converters from other tools' files into what tptrain starts from.
//
// nanoGPT: tests/nanogpt_roundtrip.py builds small nanoGPT checkpoints (with biases; bias=False with
// torch.compile's prefix), converts them with scripts/nanogpt_to_tptrain.py and checks, through
// tptrain's debug.dump_init, that every weight tptrain starts from equals nanoGPT's. It needs torch;
// without it the case skips, visibly.
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define OUT_CAP (1 << 16)

// A python3 that can import torch ("" if none): the one on PATH, else the system's.
static const char *python_with_torch(void) {
    static const char *const tries[] = {"python3", "/usr/bin/python3"};
    char out[256];
    for (size_t i = 0; i < sizeof tries / sizeof tries[0]; i++)
        if (tu_run(out, sizeof out, "%s -c 'import torch' 2>/dev/null", tries[i]) == 0) return tries[i];
    return "";
}

Test(convert, nanogpt_checkpoint_starts_tptrain_with_its_weights) {
    const char *py = python_with_torch();
    if (!py[0]) cr_skip_test("no python3 with torch here: sh scripts/setup_debian.sh --with-torch installs it");
    char dir[256], *out = malloc(OUT_CAP);
    tu_tmpdir(dir, sizeof dir, "nanogpt");
    int rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 300 %s tests/nanogpt_roundtrip.py '%s' '%s'", tu_source_root(),
                    py, tu_tptrain(), dir);
    cr_assert_eq(rc, 0, "nanoGPT round trip failed (exit %d):\n%s", rc, out);
    cr_assert(strstr(out, "bias=1 compiled=0: 28 tensors compared, 0 bad"), "%s", out);
    cr_assert(strstr(out, "bias=0 compiled=1: 28 tensors compared, 0 bad"), "%s", out);
    free(out);
    tu_rmtree(dir);
}

Test(convert, nanogpt_converter_refuses_other_files) {
    const char *py = python_with_torch();
    if (!py[0]) cr_skip_test("no python3 with torch here: sh scripts/setup_debian.sh --with-torch installs it");
    char dir[256], path[512], out[4096];
    tu_tmpdir(dir, sizeof dir, "nanogpt_bad");
    tu_write_file(path, sizeof path, dir, "not_a_ckpt.pt", "hello\n");
    int rc = tu_run(out, sizeof out, "cd '%s' && %s scripts/nanogpt_to_tptrain.py '%s' '%s/out'", tu_source_root(), py,
                    path, dir);
    cr_assert_eq(rc, 2, "exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "cannot read as a torch checkpoint"), "%s", out);
    tu_rmtree(dir);
}
