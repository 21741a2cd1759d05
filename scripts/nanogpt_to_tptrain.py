#!/usr/bin/env python3
"""nanogpt_to_tptrain.py: a nanoGPT checkpoint (ckpt.pt) as weights tptrain starts from.

    python3 scripts/nanogpt_to_tptrain.py out/ckpt.pt OUT_DIR

nanoGPT stores torch.nn.Linear weights as (out, in); tptrain reads Hugging Face GPT-2 files, whose
Conv1D weights are (in, out). This writes OUT_DIR/model.safetensors under the Hugging Face names
with those four weights per layer transposed (c_attn, attn.c_proj, c_fc, mlp.c_proj), the tied
lm_head left out, biases that a `bias=False` model lacks written as zeros (GPT-2 has them; zero
biases compute the same function), a torch.compile prefix (`_orig_mod.`) dropped, and
OUT_DIR/config.json (transformers' GPT2Config) beside it. It prints the tptrain flags for the
model's shape. Needs torch (to unpickle ckpt.pt); writes safetensors itself.
"""
import json
import os
import struct
import sys


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    src, out_dir = sys.argv[1], sys.argv[2]
    try:
        import torch
    except ImportError:
        print("nanogpt_to_tptrain.py: needs torch to read %s (pip install torch, or Debian's python3-torch)"
              % src, file=sys.stderr)
        return 2
    try:
        ck = torch.load(src, map_location="cpu", weights_only=False)
    except TypeError:  # torch before 1.13 has no weights_only
        ck = torch.load(src, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        print("nanogpt_to_tptrain.py: %s: cannot read as a torch checkpoint: %s" % (src, e), file=sys.stderr)
        return 2
    if not isinstance(ck, dict) or "model" not in ck or "model_args" not in ck:
        print("nanogpt_to_tptrain.py: %s: not a nanoGPT checkpoint (no 'model' and 'model_args'); "
              "for a Hugging Face directory use init.from directly" % src, file=sys.stderr)
        return 2
    args = ck["model_args"]
    L, H, C, V, T = (int(args[k]) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"))
    sd = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in ck["model"].items()}

    def get(name, shape):
        key = "transformer." + name
        if key in sd:
            t = sd[key].detach().to(torch.float32).contiguous()
            if tuple(t.shape) != shape:
                raise SystemExit("nanogpt_to_tptrain.py: %s: %s has shape %s, expected %s from model_args"
                                 % (src, key, tuple(t.shape), shape))
            return t
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.float32)  # bias=False: the same function
        raise SystemExit("nanogpt_to_tptrain.py: %s: %s is missing" % (src, key))

    tensors = [("wte.weight", get("wte.weight", (V, C))), ("wpe.weight", get("wpe.weight", (T, C)))]
    for i in range(L):
        p = "h.%d." % i
        tensors += [
            (p + "ln_1.weight", get(p + "ln_1.weight", (C,))), (p + "ln_1.bias", get(p + "ln_1.bias", (C,))),
            (p + "attn.c_attn.weight", get(p + "attn.c_attn.weight", (3 * C, C)).t().contiguous()),
            (p + "attn.c_attn.bias", get(p + "attn.c_attn.bias", (3 * C,))),
            (p + "attn.c_proj.weight", get(p + "attn.c_proj.weight", (C, C)).t().contiguous()),
            (p + "attn.c_proj.bias", get(p + "attn.c_proj.bias", (C,))),
            (p + "ln_2.weight", get(p + "ln_2.weight", (C,))), (p + "ln_2.bias", get(p + "ln_2.bias", (C,))),
            (p + "mlp.c_fc.weight", get(p + "mlp.c_fc.weight", (4 * C, C)).t().contiguous()),
            (p + "mlp.c_fc.bias", get(p + "mlp.c_fc.bias", (4 * C,))),
            (p + "mlp.c_proj.weight", get(p + "mlp.c_proj.weight", (C, 4 * C)).t().contiguous()),
            (p + "mlp.c_proj.bias", get(p + "mlp.c_proj.bias", (C,))),
        ]
    tensors += [("ln_f.weight", get("ln_f.weight", (C,))), ("ln_f.bias", get("ln_f.bias", (C,)))]

    # safetensors: 8-byte little-endian header length, the JSON header, the raw little-endian data
    header, offset, blobs = {"__metadata__": {"format": "pt", "source": "nanoGPT"}}, 0, []
    for name, t in tensors:
        raw = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)
    os.replace(path + ".tmp", path)
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": L, "n_head": H, "n_embd": C,
           "vocab_size": V, "n_positions": T, "n_ctx": T, "activation_function": "gelu_new",
           "layer_norm_epsilon": 1e-05, "tie_word_embeddings": True, "torch_dtype": "float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    flags = ("--set model.n_layer=%d --set model.n_head=%d --set model.n_embd=%d --set model.vocab_size=%d "
             "--set model.seq_len=%d --set init.from=%s" % (L, H, C, V, T, path))
    print("wrote %s (%d tensors, %.1f MB) and config.json" % (path, len(tensors), offset / 1e6))
    print("train from it:  build/tptrain CONFIG.yaml " + flags)
    if V % 128 == 0 and V > 50257:
        print("note: vocab_size %d is nanoGPT's padded GPT-2 vocabulary; its extra rows are kept as tokens "
              "the data never uses" % V)
    return 0


if __name__ == "__main__":
    sys.exit(main())
