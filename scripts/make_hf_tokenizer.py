#!/usr/bin/env python3
"""make_hf_tokenizer.py: GPT-2's vocab.json and merges.txt from data/gpt2_tokenizer.bin (standard library only).

    python3 scripts/make_hf_tokenizer.py [data/gpt2_tokenizer.bin] [data]

The decode table lists the bytes of each of GPT-2's 50257 tokens in id order: ids 0-255 are the
single bytes (in GPT-2's order), ids 256-50255 the merges in rank order (id = 256 + rank), 50256
<|endoftext|>. vocab.json is each token's bytes through GPT-2's byte-to-unicode table. A version 3
file carries the merges; from a version 1 or 2 file (llm.c's) the merge that made a token is
recovered by running byte-level BPE on its bytes with only the merges ranked below it: what is
left is exactly two tokens, the pair it was merged from. Writes
DIR/gpt2_vocab.json and DIR/gpt2_merges.txt, which tptrain copies into every checkpoint as
vocab.json and merges.txt so that transformers' AutoTokenizer loads the directory.
"""
import json
import os
import struct
import sys


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = keep[:], 0
    table = {}
    for b in range(256):
        if b not in keep:
            table[b] = chr(256 + n)
            n += 1
        else:
            table[b] = chr(b)
    return table


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "data/gpt2_tokenizer.bin"
    out = sys.argv[2] if len(sys.argv) > 2 else "data"
    blob = open(src, "rb").read()
    magic, version, n_vocab, eot = struct.unpack("<4I", blob[:16])
    if magic != 20240328 or version not in (1, 2, 3):
        print("make_hf_tokenizer.py: %s: not a GPT-2 decode table (magic %d, version %d)" % (src, magic, version),
              file=sys.stderr)
        return 2
    toks, off = [], 1024
    for _ in range(n_vocab):
        ln = blob[off]
        toks.append(blob[off + 1:off + 1 + ln])
        off += 1 + ln
    byte_id = {t[0]: i for i, t in enumerate(toks[:256])}
    if len(byte_id) != 256 or any(len(t) != 1 for t in toks[:256]):
        print("make_hf_tokenizer.py: %s: ids 0-255 are not the 256 single bytes" % src, file=sys.stderr)
        return 2
    b2u = bytes_to_unicode()
    name = lambda t: "".join(b2u[b] for b in t)
    n_merges = eot - 256
    id_of = {toks[i]: i for i in range(eot)}
    merges = []
    if version == 3:  # the file carries its merges (left, right, result), in rank order
        count = struct.unpack("<I", blob[16:20])[0]
        for r in range(count):
            left, right, _ = struct.unpack("<3I", blob[off + 12 * r:off + 12 * r + 12])
            merges.append("%s %s" % (name(toks[left]), name(toks[right])))
        n_merges = 0
    for r in range(n_merges):
        t = toks[256 + r]
        parts = [bytes([b]) for b in t]
        while True:  # BPE with the merges ranked below r only
            best, at = None, -1
            for i in range(len(parts) - 1):
                m = id_of.get(parts[i] + parts[i + 1])
                if m is not None and 256 <= m < 256 + r and (best is None or m < best):
                    best, at = m, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            print("make_hf_tokenizer.py: token %d (%r) does not split into one merge" % (256 + r, t), file=sys.stderr)
            return 1
        merges.append("%s %s" % (name(parts[0]), name(parts[1])))
    vocab = {name(toks[i]): i for i in range(eot)}
    vocab["<|endoftext|>"] = eot
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpt2_vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out, "gpt2_merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    print("wrote %s/gpt2_vocab.json (%d tokens) and %s/gpt2_merges.txt (%d merges)" % (out, len(vocab), out,
                                                                                      len(merges)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
