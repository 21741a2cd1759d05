#!/usr/bin/env python3
# hf_check.py: checks that transformers loads a tptrain checkpoint and gives tptrain's loss and text.
#
# hf_check.py CKPT_DIR VAL_SHARD B T BATCHES GEN_OUT N_GEN [--tptrain BIN] [--prompt TEXT]
#
# Loads CKPT_DIR (a step_NNNNNNNN directory) as a user would: AutoModelForCausalLM,
# AutoTokenizer and pipeline("text-generation"). Prints transformers' validation loss over the
# blocks that `tptrain --eval --batches BATCHES` reads (BATCHES micro-batches of B sequences of
# T + 1 tokens, stride T, from the start of VAL_SHARD), and writes a greedy continuation of N_GEN
# tokens (from TEXT, or from end-of-text) to GEN_OUT. With --tptrain it also runs BIN --eval on
# the same data and BIN --eval --generate N_GEN --top-k 1 on the same prompt, and exits 1 unless
# the losses agree to 1e-4 relative and the greedy ids are the same. Run from the repository root
# (tptrain reads data/gpt2_tokenizer.bin). Needs torch, numpy and transformers.
import argparse, subprocess, sys
import numpy as np, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

ap = argparse.ArgumentParser(description="transformers against tptrain on one checkpoint directory")
ap.add_argument("ckpt"); ap.add_argument("val"); ap.add_argument("B", type=int); ap.add_argument("T", type=int)
ap.add_argument("batches", type=int); ap.add_argument("gen_out"); ap.add_argument("n_gen", type=int)
ap.add_argument("--tptrain", help="tptrain binary to compare with (e.g. build/tptrain)")
ap.add_argument("--prompt", help="text to generate from (default: end-of-text)")
a = ap.parse_args()
torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)

model = AutoModelForCausalLM.from_pretrained(a.ckpt, torch_dtype=torch.float32, attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(a.ckpt)
print(f"AutoModelForCausalLM: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"n_positions {model.config.n_positions}; AutoTokenizer: {type(tok).__name__}, {len(tok)} tokens")
V = model.config.vocab_size
ids_all = np.fromfile(a.val, dtype=np.uint16, offset=1024).astype(np.int64)
total = 0.0
with torch.no_grad():
    for k in range(a.batches):
        seqs = np.stack([ids_all[(k * a.B + j) * a.T:(k * a.B + j) * a.T + a.T + 1] for j in range(a.B)])
        x, y = torch.tensor(seqs[:, :a.T]), torch.tensor(seqs[:, 1:])
        logits = model(x).logits
        total += F.cross_entropy(logits.reshape(-1, V).double(), y.reshape(-1), reduction="sum").item()
hf_loss = total / (a.batches * a.B * a.T)
print(f"transformers val loss {hf_loss:.6f} | {a.batches} batches of {a.B} x {a.T}")

prompt_ids = tok(a.prompt)["input_ids"] if a.prompt else [tok.eos_token_id]
with torch.no_grad():
    x = torch.tensor([prompt_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.n_gen, do_sample=False,
                         pad_token_id=tok.eos_token_id)[0].tolist()
hf_ids = out[len(prompt_ids):]
text = tok.decode(out)
open(a.gen_out, "w", encoding="utf-8").write(text)
print(f"transformers greedy ids: {' '.join(map(str, out))}")
pipe = pipeline("text-generation", model=a.ckpt, device="cpu")
pipe_text = pipe(a.prompt or tok.eos_token, max_new_tokens=a.n_gen, do_sample=False,
                 pad_token_id=tok.eos_token_id)[0]["generated_text"]
print(f"pipeline text: {pipe_text!r}")
ok = pipe_text == text
if not ok:
    print(f"differ: pipeline text and generate's decoded ids ({text!r})")

if a.tptrain:
    sets = ["--set", f"train.micro_batch={a.B}", "--set", f"model.seq_len={a.T}"]
    r = subprocess.run([a.tptrain, "--eval", a.ckpt, "--data", a.val, "--batches", str(a.batches)] + sets,
                       capture_output=True, text=True, check=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("val loss")][-1]
    tp_loss = float(line.split()[2])
    rel = abs(tp_loss - hf_loss) / abs(hf_loss)
    print(f"tptrain {line}")
    print(f"loss: tptrain {tp_loss:.6f} transformers {hf_loss:.6f} relative difference {rel:.1e}: "
          f"{'ok' if rel <= 1e-4 else 'differ'}")
    ok &= rel <= 1e-4
    gen = [a.tptrain, "--eval", a.ckpt, "--generate", str(a.n_gen), "--top-k", "1", "--format", "ids"]
    gen += ["--prompt", a.prompt] if a.prompt else []
    r = subprocess.run(gen, capture_output=True, text=True, check=True)
    tp_all = [int(t) for t in r.stdout.split()]
    tp_ids = tp_all[len(prompt_ids):]  # the prompt's ids (end-of-text without one), then the sample's
    if tp_all[:len(prompt_ids)] != prompt_ids:
        print(f"differ: prompt ids, tptrain {tp_all[:len(prompt_ids)]} AutoTokenizer {prompt_ids}")
        ok = False
    same = tp_ids == hf_ids
    first = next((i for i, (p, q) in enumerate(zip(tp_ids, hf_ids)) if p != q), None)
    print(f"greedy: {len(hf_ids)} tokens, tptrain --top-k 1 and transformers "
          f"{'identical' if same else f'differ from token {first}'}")
    ok &= same
    print("hf_check: " + ("ok" if ok else "FAILED"))
sys.exit(0 if ok else 1)
