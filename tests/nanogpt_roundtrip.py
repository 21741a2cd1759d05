#!/usr/bin/env python3
# nanogpt_roundtrip.py TPTRAIN DIR: makes a small nanoGPT-style ckpt.pt (torch.nn.Linear layout,
# optionally bias=False and torch.compile's _orig_mod. prefix), converts it with
# scripts/nanogpt_to_tptrain.py, starts tptrain from it (init.from) with debug.dump_init, and checks
# that every tensor tptrain started from equals nanoGPT's (transposed where Conv1D needs it).
# Exit 0 when all match, 1 otherwise, 77 when torch is missing (the test then skips).
import json, os, struct, subprocess, sys
try:
    import torch
except ImportError:
    sys.exit(77)
tptrain, d = sys.argv[1], sys.argv[2]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_safetensors(path):
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    hdr = json.loads(blob[8:8 + n])
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        t = torch.frombuffer(bytearray(blob[8 + n + a:8 + n + b]), dtype=torch.float32).reshape(v["shape"])
        out[k] = t
    return out


def case(bias, compiled):
    L, H, C, V, T = 2, 4, 64, 50257, 32
    g = torch.Generator().manual_seed(7 + bias + 2 * compiled)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C),
          "transformer.ln_f.weight": 1 + r(C), "lm_head.weight": None}
    if bias:
        sd["transformer.ln_f.bias"] = r(C)
    for i in range(L):
        p = "transformer.h.%d." % i
        for name, shape in (("ln_1", (C,)), ("ln_2", (C,))):
            sd[p + name + ".weight"] = 1 + r(*shape)
            if bias:
                sd[p + name + ".bias"] = r(*shape)
        for name, (o, i_) in (("attn.c_attn", (3 * C, C)), ("attn.c_proj", (C, C)), ("mlp.c_fc", (4 * C, C)),
                              ("mlp.c_proj", (C, 4 * C))):
            sd[p + name + ".weight"] = r(o, i_)
            if bias:
                sd[p + name + ".bias"] = r(o)
        sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)  # old nanoGPT's mask buffer
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    args = dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=bool(bias), vocab_size=V, dropout=0.0)
    ck = os.path.join(d, "ckpt_%d_%d.pt" % (bias, compiled))
    torch.save({"model": sd, "model_args": args, "iter_num": 10, "config": {}}, ck)
    out = os.path.join(d, "conv_%d_%d" % (bias, compiled))
    subprocess.run([sys.executable, os.path.join(root, "scripts", "nanogpt_to_tptrain.py"), ck, out], check=True)
    dump = os.path.join(d, "dump_%d_%d.safetensors" % (bias, compiled))
    subprocess.run([tptrain, "configs/tiny.yaml", "--set", "init.from=" + os.path.join(out, "model.safetensors"),
                    "--set", "debug.dump_init=" + dump, "--set", "train.steps=6", "--set", "parallel.device=cpu"],
                   cwd=root, check=True, stdout=subprocess.DEVNULL)
    got = read_safetensors(dump)
    bad = 0
    for k, t in sd.items():
        k = k[len("_orig_mod."):] if compiled else k
        if k == "lm_head.weight" or k.endswith("attn.bias") and t.dim() == 4:
            continue
        name = k[len("transformer."):]
        want = t.t() if name.endswith(".weight") and t.dim() == 2 and "wte" not in name and "wpe" not in name else t
        if name not in got or not torch.equal(got[name], want.to(torch.float32)):
            print("mismatch:", name, "bias=%s compiled=%s" % (bias, compiled))
            bad += 1
    for name, t in got.items():  # what nanoGPT lacked (bias=False) must have started at zero
        if "transformer." + name not in sd and ("_orig_mod.transformer." + name) not in sd:
            if not name.endswith(".bias") or t.abs().max().item() != 0.0:
                print("unexpected:", name)
                bad += 1
    print("bias=%s compiled=%s: %d tensors compared, %d bad" % (bias, compiled, len(got), bad))
    return bad


sys.exit(1 if sum(case(b, c) for b, c in ((1, 0), (0, 1))) else 0)
