// test_convert.c: converters from other tools' files into what tptrain starts from.
//
// nanoGPT: tests/nanogpt_roundtrip.py builds small nanoGPT checkpoints (with biases; bias=False with
// torch.compile's prefix), converts them with scripts/nanogpt_to_tptrain.py and checks, through
// tptrain's debug.dump_init, that every weight tptrain starts from equals nanoGPT's. It needs torch;
// without it the case skips, visibly.
#include <criterion/criterion.h>
#include <stdbool.h>
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

// ---- Hugging Face directories (init.from)

static bool files_same(const char *a, const char *b) {
    char out[256];
    return tu_run(out, sizeof out, "cmp -s '%s' '%s'", a, b) == 0;
}

// A save_pretrained directory, whole or in shards (with or without the transformer. prefix), starts
// tptrain with exactly its weights; config.json fields tptrain does not implement are refused by name.
Test(convert, hugging_face_directory_whole_and_sharded) {
    char dir[256], *out = malloc(OUT_CAP);
    tu_tmpdir(dir, sizeof dir, "hfdir");
    // a tptrain checkpoint's model.safetensors and config.json are what save_pretrained writes
    int rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set checkpoint.dir='%s/ck' && mkdir -p '%s/hf' && cp '%s/ck/step_00000006/model.safetensors' "
                    "'%s/ck/step_00000006/config.json' '%s/hf/' && python3 tests/hf_shard.py '%s/hf/model.safetensors' "
                    "'%s/sharded' 3 && cp '%s/hf/config.json' '%s/sharded/' && python3 tests/hf_shard.py "
                    "'%s/hf/model.safetensors' '%s/prefixed' 2 --prefix transformer. && cp '%s/hf/config.json' '%s/prefixed/'",
                    tu_source_root(), tu_tptrain(), dir, dir, dir, dir, dir, dir, dir, dir, dir, dir, dir, dir, dir);
    cr_assert_eq(rc, 0, "%s", out);
    const char *variants[] = {"hf", "sharded", "prefixed"};
    for (int i = 0; i < 3; i++) {
        rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set init.from='%s/%s' --set debug.dump_init='%s/%s.safetensors'",
                    tu_source_root(), tu_tptrain(), dir, variants[i], dir, variants[i]);
        cr_assert_eq(rc, 0, "init.from %s: exit %d\n%s", variants[i], rc, out);
        char a[600], b[600];
        snprintf(a, sizeof a, "%s/%s.safetensors", dir, variants[i]);
        snprintf(b, sizeof b, "%s/hf.safetensors", dir);
        if (i) cr_assert(files_same(a, b), "init.from %s started from other weights than the whole file", variants[i]);
    }
    // the starting weights are the checkpoint's: dumping them gives its model.safetensors' tensors
    rc = tu_run(out, OUT_CAP, "python3 -c 'import json,struct,sys\n"
                "def t(p):\n b=open(p,\"rb\").read(); n=struct.unpack(\"<Q\",b[:8])[0]; h=json.loads(b[8:8+n])\n"
                " return {k:b[8+n+v[\"data_offsets\"][0]:8+n+v[\"data_offsets\"][1]] for k,v in h.items() if k!=\"__metadata__\"}\n"
                "x,y=t(sys.argv[1]),t(sys.argv[2]); bad=[k for k in x if x[k]!=y.get(k)]; print(len(x),bad); sys.exit(1 if bad else 0)' "
                "'%s/hf/model.safetensors' '%s/hf.safetensors'", dir, dir);
    cr_assert_eq(rc, 0, "the weights tptrain started from differ from the directory's: %s", out);
    // refused by name
    struct { const char *edit, *needle; } bad[] = {
        {"s/\"gelu_new\"/\"relu\"/", "activation_function is relu"},
        {"s/\"layer_norm_epsilon\": [0-9.e+-]*/\"layer_norm_epsilon\": 1e-06/", "layer_norm_epsilon is 1e-06"},
        {"s/\"n_head\": 4/\"n_head\": 2/", "n_head is 2, this run has model.n_head=4"},
        {"s/\"scale_attn_weights\": true/\"scale_attn_weights\": true, \"reorder_and_upcast_attn\": true/",
         "reorder_and_upcast_attn is not false"},
        {"s/\"n_inner\": null/\"n_inner\": 100/", "n_inner is not 4*n_embd"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        rc = tu_run(out, OUT_CAP, "cp '%s/ck/step_00000006/config.json' '%s/hf/config.json' && sed -i '%s' '%s/hf/config.json' "
                    "&& cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 --set init.from='%s/hf'",
                    dir, dir, bad[k].edit, dir, tu_source_root(), tu_tptrain(), dir);
        cr_assert_eq(rc, 2, "%s: exit %d, want 2:\n%s", bad[k].needle, rc, out);
        cr_assert(strstr(out, bad[k].needle), "message lacks '%s':\n%s", bad[k].needle, out);
    }
    free(out);
    tu_rmtree(dir);
}

// ---- Hugging Face out: a checkpoint directory carries GPT-2's tokenizer files

// vocab.json and merges.txt (from data/, made by scripts/make_hf_tokenizer.py) tokenise the validation
// shard back to the very ids tiktoken wrote; tokenizer_config.json and generation_config.json sit beside.
Test(convert, checkpoint_carries_the_gpt2_tokenizer) {
    char dir[256], *out = malloc(OUT_CAP);
    tu_tmpdir(dir, sizeof dir, "hfout");
    int rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set checkpoint.dir='%s/ck'", tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 0, "%s", out);
    rc = tu_run(out, OUT_CAP, "cd '%s/ck/step_00000006' && ls vocab.json merges.txt tokenizer_config.json "
                "generation_config.json && grep -q '\"eos_token_id\": 50256' generation_config.json && "
                "grep -q GPT2Tokenizer tokenizer_config.json && "
                "grep -q '\"clean_up_tokenization_spaces\": false' tokenizer_config.json", dir);
    cr_assert_eq(rc, 0, "tokenizer files missing or wrong:\n%s", out);
    rc = tu_run(out, OUT_CAP, "cd '%s' && python3 tests/hf_tokenizer_check.py '%s/ck/step_00000006' "
                "data/tinyshakespeare_val.bin", tu_source_root(), dir);
    if (rc == 77) cr_skip_test("python3 has no regex module (pip install regex): the encoding check is skipped");
    cr_assert_eq(rc, 0, "the checkpoint's vocab.json / merges.txt do not reproduce GPT-2's ids:\n%s", out);
    cr_assert(strstr(out, "32768 tokens re-encoded: ok"), "%s", out);
    free(out);
    tu_rmtree(dir);
}

// ---- llm.c's model file

// --export-llmc writes llm.c's gpt2_*.bin (version 3 fp32, version 5 bf16) and init.from reads it back:
// the fp32 round trip gives the checkpoint's weights bit for bit, the bf16 one within bf16 rounding; a
// file for another shape is refused naming the field.
Test(convert, llmc_model_file_round_trip) {
    char dir[256], *out = malloc(OUT_CAP);
    tu_tmpdir(dir, sizeof dir, "llmc");
    int rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 --set checkpoint.dir='%s/ck' "
                    ">/dev/null && '%s' --eval '%s/ck' --export-llmc '%s/m.bin' && '%s' --eval '%s/ck' --export-llmc '%s/m_bf16.bin'",
                    tu_source_root(), tu_tptrain(), dir, tu_tptrain(), dir, dir, tu_tptrain(), dir, dir);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "version 3 (fp32)") && strstr(out, "version 5 (bf16)"), "%s", out);
    const char *files[2] = {"m.bin", "m_bf16.bin"};
    for (int k = 0; k < 2; k++) {
        rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 --set init.from='%s/%s' "
                    "--set debug.dump_init='%s/d%d.safetensors'", tu_source_root(), tu_tptrain(), dir, files[k], dir, k);
        cr_assert_eq(rc, 0, "init.from %s: exit %d\n%s", files[k], rc, out);
    }
    // fp32: the same bytes as the checkpoint's tensors; bf16: within bf16's rounding (2^-8 relative)
    rc = tu_run(out, OUT_CAP, "python3 -c 'import json,struct,sys,array\n"
                "def t(p):\n b=open(p,\"rb\").read(); n=struct.unpack(\"<Q\",b[:8])[0]; h=json.loads(b[8:8+n])\n"
                " return {k:b[8+n+v[\"data_offsets\"][0]:8+n+v[\"data_offsets\"][1]] for k,v in h.items() if k!=\"__metadata__\"}\n"
                "ck,a,b=t(sys.argv[1]),t(sys.argv[2]),t(sys.argv[3])\n"
                "bad=[k for k in ck if ck[k]!=a.get(k)]\n"
                "worst=0.0\n"
                "for k in ck:\n x=array.array(\"f\",ck[k]); y=array.array(\"f\",b[k])\n"
                " worst=max([worst]+[abs(p-q)/max(abs(p),1e-30) for p,q in zip(x,y) if p!=0])\n"
                "print(len(ck),bad,worst); sys.exit(1 if bad or worst>2**-8 else 0)' "
                "'%s/ck/step_00000006/model.safetensors' '%s/d0.safetensors' '%s/d1.safetensors'", dir, dir, dir);
    cr_assert_eq(rc, 0, "round trip differs: %s", out);
    rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 60 '%s' configs/tiny.yaml --set model.n_layer=3 --set init.from='%s/m.bin'",
                tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "n_layer is 2 in the file, this run has model.n_layer=3"), "%s", out);
    rc = tu_run(out, OUT_CAP, "head -c 5000 '%s/m.bin' > '%s/cut.bin' && cd '%s' && timeout 60 '%s' configs/tiny.yaml "
                "--set init.from='%s/cut.bin'", dir, dir, tu_source_root(), tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "a truncated file: exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "truncated"), "%s", out);
    free(out);
    tu_rmtree(dir);
}

// --eval of a Hugging Face directory gives the same validation loss and the same samples as --eval of
// the tptrain checkpoint it was copied from; a directory with neither is refused.
Test(convert, eval_of_a_hugging_face_directory) {
    char dir[256], *out = malloc(OUT_CAP), *ref = malloc(OUT_CAP);
    tu_tmpdir(dir, sizeof dir, "hfeval");
    int rc = tu_run(out, OUT_CAP, "cd '%s' && timeout 120 '%s' configs/tiny.yaml --set train.steps=6 "
                    "--set checkpoint.dir='%s/ck' >/dev/null && mkdir -p '%s/hf' && cp '%s/ck/step_00000006/model.safetensors' "
                    "'%s/ck/step_00000006/config.json' '%s/hf/'", tu_source_root(), tu_tptrain(), dir, dir, dir, dir, dir);
    cr_assert_eq(rc, 0, "%s", out);
    const char *what[2] = {"--batches 2", "--generate 8 --seed 3"};
    for (int k = 0; k < 2; k++) {
        rc = tu_run(ref, OUT_CAP, "cd '%s' && '%s' --eval '%s/ck' %s | grep -v 'tokens/s\\|^eval '", tu_source_root(),
                    tu_tptrain(), dir, what[k]);
        cr_assert_eq(rc, 0, "%s", ref);
        rc = tu_run(out, OUT_CAP, "cd '%s' && '%s' --eval '%s/hf' %s | grep -v 'tokens/s\\|^eval '", tu_source_root(),
                    tu_tptrain(), dir, what[k]);
        cr_assert_eq(rc, 0, "%s", out);
        cr_assert_str_eq(out, ref, "--eval %s of the Hugging Face copy differs:\n%s\nfrom the checkpoint's:\n%s", what[k],
                         out, ref);
    }
    rc = tu_run(out, OUT_CAP, "mkdir -p '%s/empty' && '%s' --eval '%s/empty'", dir, tu_tptrain(), dir);
    cr_assert_eq(rc, 2, "%s", out);
    cr_assert(strstr(out, "no Hugging Face config.json"), "%s", out);
    free(out);
    free(ref);
    tu_rmtree(dir);
}
