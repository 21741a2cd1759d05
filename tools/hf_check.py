#!/usr/bin/env python3
# hf_check.py: checks that transformers loads a tptrain checkpoint and gives tptrain's loss and text.
#
# hf_check.py CKPT_DIR VAL_SHARD B T BATCHES GEN_OUT N_GEN: transformers' GPT2LMHeadModel loads a
# tptrain checkpoint directory; prints its validation loss over the blocks that
# `tptrain --eval --batches BATCHES` reads and writes a greedy continuation of N_GEN tokens to
# GEN_OUT, to compare with tptrain's. Needs torch, numpy and transformers.
import json, struct, sys
import numpy as np, torch, torch.nn.functional as F
from transformers import GPT2LMHeadModel
ckpt, val, B, T, batches, gen_file, n_gen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
torch.backends.cuda.matmul.allow_tf32 = False
model = GPT2LMHeadModel.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
V = model.config.vocab_size
tok = np.fromfile(val, dtype=np.uint16, offset=1024).astype(np.int64)
total = 0.0
with torch.no_grad():
    for k in range(batches):
        seqs = np.stack([tok[(k * B + j) * T:(k * B + j) * T + T + 1] for j in range(B)])
        x, y = torch.tensor(seqs[:, :T]), torch.tensor(seqs[:, 1:])
        logits = model(x).logits
        total += F.cross_entropy(logits.reshape(-1, V).double(), y.reshape(-1), reduction="sum").item()
    print(f"transformers val loss {total / (batches * B * T):.6f}")
    ids = torch.tensor([[50256]])
    out = model.generate(ids, max_new_tokens=n_gen, do_sample=False, pad_token_id=50256)[0].tolist()
blob = open("data/gpt2_tokenizer.bin", "rb").read()
nv = struct.unpack("<256I", blob[:1024])[2]
pieces, off = [], 1024
for _ in range(nv):
    ln = blob[off]; pieces.append(blob[off + 1:off + 1 + ln]); off += 1 + ln
open(gen_file, "wb").write(b"".join(pieces[t] for t in out))
