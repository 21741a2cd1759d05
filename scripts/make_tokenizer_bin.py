#!/usr/bin/env python3
"""make_tokenizer_bin.py: a byte-level BPE tokenizer (vocab.json + merges.txt) as tptrain's tokenizer file, version 3 (standard library only).

    python3 scripts/make_tokenizer_bin.py [--vocab data/gpt2_vocab.json] [--merges data/gpt2_merges.txt]
                                          [--eot '<|endoftext|>'] [-o data/gpt2_tokenizer.bin]

vocab.json maps each token, spelt through GPT-2's byte-to-unicode table, to its id; merges.txt
lists the merges in rank order, one "LEFT RIGHT" pair a line after a "#version" line. These are
the files of OpenAI's GPT-2 release (encoder.json and vocab.bpe) and of Hugging Face's GPT-2
tokenizers; data/gpt2_merges.txt is byte for byte OpenAI's vocab.bpe (the SHA-256 tiktoken pins).
The output (docs/text.md describes it) holds the decode table of llm.c's version 2 file and then
every merge as (left, right, result) token ids, so that tptrain can encode text as well as decode
it. Any other id order works too: the merges name their ids.
"""
import argparse
import json
import os
import struct
import sys

MAGIC = 20240328
VERSION = 3
PRETOKENIZER_GPT2 = 1
HEADER_INTS = 256


def fail(msg):
    print("make_tokenizer_bin.py: " + msg, file=sys.stderr)
    sys.exit(2)


def unicode_to_bytes():
    """The inverse of GPT-2's byte-to-unicode table: printable bytes stand for themselves, the
    other 68 are shifted to U+0100 and up, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


def token_bytes(name, u2b):
    """A vocab.json key as bytes; added tokens such as <|endoftext|> are spelt as plain text."""
    if all(c in u2b for c in name):
        return bytes(u2b[c] for c in name)
    return name.encode("utf-8")


def main():
    p = argparse.ArgumentParser(description="Write tptrain's tokenizer file (version 3) from vocab.json "
                                "and merges.txt.")
    p.add_argument("--vocab", default="data/gpt2_vocab.json")
    p.add_argument("--merges", default="data/gpt2_merges.txt")
    p.add_argument("--eot", default="<|endoftext|>", help="the end-of-text token's name in vocab.json")
    p.add_argument("-o", "--out", default="data/gpt2_tokenizer.bin")
    args = p.parse_args()
    u2b = unicode_to_bytes()
    try:
        with open(args.vocab, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(args.merges, encoding="utf-8") as f:
            merge_lines = f.read().split("\n")
    except (OSError, ValueError) as e:
        fail(str(e))
    n = len(vocab)
    ids = sorted(vocab.values())
    if ids != list(range(n)):
        fail("%s: the ids are not 0..%d without gaps" % (args.vocab, n - 1))
    if args.eot not in vocab:
        fail("%s: no token %r; pass the end-of-text token's name with --eot" % (args.vocab, args.eot))
    pieces = [b""] * n
    for name, i in vocab.items():
        pieces[i] = token_bytes(name, u2b)
        if len(pieces[i]) > 255:
            fail("%s: token %d is %d bytes; the file stores at most 255" % (args.vocab, i, len(pieces[i])))
    merges = []
    for k, line in enumerate(merge_lines):
        if not line or (k == 0 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            fail("%s:%d: expected two tokens separated by one space" % (args.merges, k + 1))
        left, right = parts
        for t in (left, right, left + right):
            if t not in vocab:
                fail("%s:%d: %r is not in %s" % (args.merges, k + 1, t, args.vocab))
        merges.append((vocab[left], vocab[right], vocab[left + right]))
    header = [MAGIC, VERSION, n, vocab[args.eot], len(merges), PRETOKENIZER_GPT2]
    header += [0] * (HEADER_INTS - len(header))
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<%dI" % HEADER_INTS, *header))
        for piece in pieces:
            f.write(bytes([len(piece)]) + piece)
        for m in merges:
            f.write(struct.pack("<3I", *m))
    os.replace(tmp, args.out)
    print("wrote %s: version %d, %d tokens, end-of-text %d, %d merges" % (args.out, VERSION, n, vocab[args.eot],
                                                                        len(merges)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
