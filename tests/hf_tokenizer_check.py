#!/usr/bin/env python3
# hf_tokenizer_check.py DIR SHARD: the vocab.json and merges.txt in DIR encode text exactly as GPT-2
# does: the tokens of a token shard (made by tiktoken's gpt2 encoding) are decoded to text and encoded
# again with GPT-2's pre-tokenising pattern and byte-level BPE on DIR's files; the ids must come back
# the same. Exit 0 when they do, 1 when not, 77 when the `regex` module (for \p{L}) is missing.
import json, struct, sys
try:
    import regex
except ImportError:
    sys.exit(77)
d, shard = sys.argv[1], sys.argv[2]
vocab = json.load(open(d + "/vocab.json", encoding="utf-8"))
merges = [tuple(l.split()) for l in open(d + "/merges.txt", encoding="utf-8").read().splitlines()[1:] if l]
rank = {m: i for i, m in enumerate(merges)}
keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
b2u, n = {}, 0
for b in range(256):
    b2u[b] = chr(b) if b in keep else chr(256 + n)
    n += b not in keep
u2b = {v: k for k, v in b2u.items()}
inv = {i: t for t, i in vocab.items()}
pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bpe(word):
    parts = list(word)
    while len(parts) > 1:
        pairs = [(rank.get((parts[i], parts[i + 1]), 1 << 30), i) for i in range(len(parts) - 1)]
        r, i = min(pairs)
        if r == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [vocab[p] for p in parts]


def encode(text):
    ids = []
    for piece in pat.findall(text):
        ids += bpe("".join(b2u[b] for b in piece.encode("utf-8")))
    return ids


blob = open(shard, "rb").read()
count = struct.unpack("<256i", blob[:1024])[2]
toks = list(struct.unpack("<%dH" % count, blob[1024:1024 + 2 * count]))
eot = vocab["<|endoftext|>"]
docs, cur = [], []
for t in toks:
    if t == eot:
        docs.append(cur); cur = []
    else:
        cur.append(t)
docs.append(cur)
bad = 0
for doc in docs:
    text = bytes(u2b[c] for t in doc for c in inv[t]).decode("utf-8")
    if encode(text) != doc:
        bad += 1
print("%d documents, %d tokens re-encoded: %s" % (len(docs), len(toks), "ok" if not bad else "%d differ" % bad))
sys.exit(1 if bad else 0)
