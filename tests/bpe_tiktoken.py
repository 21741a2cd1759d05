#!/usr/bin/env python3
"""bpe_tiktoken.py: tiktoken's gpt2 ids for the bpe suite's inputs (write), and random texts through tptrain --encode against tiktoken (fuzz).

    python3 tests/bpe_tiktoken.py write                      # run from the repository root
    python3 tests/bpe_tiktoken.py fuzz --tptrain build/tptrain [--rounds 20] [--seed 1]

write: tests/data/bpe_stress.ids (the ids of tests/data/bpe_stress.txt, encode_ordinary) and
tests/data/bpe_cases.txt (one case a line: the input's bytes in hex, a tab, the ids of
Encoding._encode_bytes, which is how tiktoken encodes bytes that need not be UTF-8); it also checks
that the shipped Tiny Shakespeare shards, both pairs, are tiktoken's ids of their text.
fuzz: random texts of every character class (and copies with bytes that are not UTF-8) through
tptrain --encode; any difference from tiktoken prints the first differing id with its context
and exits 1.

Needs tiktoken (pip install tiktoken). Without network access for tiktoken's first download, the
gpt2 encoding is built from data/gpt2_merges.txt, after checking that its SHA-256 is the one
tiktoken pins for OpenAI's vocab.bpe (so the ranks are tiktoken's own; scripts/prepare_data.py).
"""
import argparse
import array
import os
import random
import struct
import subprocess
import sys
import tempfile



def gpt2():
    """tiktoken's gpt2 encoding, as scripts/prepare_data.py loads it (offline from data/ too)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    import prepare_data
    return prepare_data.load_encoder()


def read_shard(path):
    with open(path, "rb") as f:
        blob = f.read()
    magic, version, count = struct.unpack("<3i", blob[:12])
    assert magic == 20240520 and version == 1 and len(blob) == 1024 + 2 * count, path
    tokens = array.array("H", blob[1024:])
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens.tolist()


def check_shards(enc):
    """The shipped shards are tiktoken's ids: the whole text after one end-of-text (tptrain's), and
    llm.c's sections, each after an end-of-text."""
    eot = enc.eot_token
    pairs = [("data/tinyshakespeare_val.bin", "data/tinyshakespeare_train.bin"),
             ("data/tinyshakespeare_llmc_val.bin", "data/tinyshakespeare_llmc_train.bin")]
    for val, train in pairs:
        if not os.path.exists(val):
            print("%s: absent, skipped" % val)
            continue
        tokens = read_shard(val) + read_shard(train)
        starts = [i for i, t in enumerate(tokens) if t == eot] + [len(tokens)]
        assert starts[0] == 0, val
        for a, b in zip(starts, starts[1:]):
            text = enc.decode_bytes(tokens[a + 1:b]).decode("utf-8")
            assert enc.encode_ordinary(text) == tokens[a + 1:b], "%s: section at token %d" % (val, a)
        print("%s + %s: %d tokens in %d documents, all equal to tiktoken's" % (val, train, len(tokens),
                                                                              len(starts) - 1))


def byte_cases(stress):
    """Inputs for bpe_cases.txt: short edge cases, then bytes that are not UTF-8 at every kind of spot."""
    cases = [b"", b" ", b"  ", b"\n", b"\n\n", b"\r\n", b"\t", b"a", b"'s", b"'S", b" 's", b"'", b"''", b"'re",
             b"'ll'", b"x's", b"?'s", b"a  b", b"a \n b", b" \n", b"word   ", b"   word", b"\xc2\xa0", b"a\xc2\xa0b",
             b"\xe3\x80\x80x", b"12 345 6789", b"\xd9\xa1\xd9\xa2", b"\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",
             b"<|endoftext|>", b"Hello, world!"]
    invalid = [b"\xff", b"\x80", b"\x80\x80\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
               b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff",
               b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"caf\xc3", b"\xe4\xbd\xa0\xe5\xa5", b"emoji \xf0\x9f\x98",
               b"hello \xff world", b"abc \x80", b"\xc0\xaf overlong", b"\xed\xa0\x80 surrogate",
               b"\xf4\x90\x80\x80 above U+10FFFF", b"\xf5\xf6\xf7\xf8\xf9\xfa\xfb\xfc\xfd\xfe\xff",
               b"word   \n\t \xfe tail", b"  \n \xff", b"x\n\n\n\xff\n\n", b"a\t\t\xffb", b"don't\xff",
               b"I'M \xff 'S", b"\xffword's  ", b"\x00\x01\x02 control chars \x7f\xff",
               b"12345\xff67890", b"\xe2\x80\xa8\xff", b"\xc2\xa0\xc2\xa0\xff",
               # the last piece starts with a white-space token after white-space pieces: tiktoken
               # re-reads them all with the bad bytes
               b"x\n\n\n \xf4\x8f\xbf\xbf\xff", b"a \t\t  \xf0\x9f\x98\x80\x80", b"\n\n \xf4\x8f\xbf\xbf\xc3",
               b"end.\n\n\n\n  \xf4\x8f\xbf\xbf\xe2\x82"]
    cases += invalid
    # the stress text with one bad byte early, in the middle and at the end: the rest is one piece
    for at in (10, len(stress) // 2, len(stress)):
        cases.append(stress[:at] + b"\xff" + stress[at:])
    # a truncated multi-byte character at the end, as a cut buffer would leave
    cases.append(stress + "\u4f60".encode()[:2])
    return cases


def write(enc):
    with open("tests/data/bpe_stress.txt", "rb") as f:
        stress = f.read()
    ids = enc.encode_ordinary(stress.decode("utf-8"))
    assert ids == enc._encode_bytes(stress)
    with open("tests/data/bpe_stress.ids", "w") as f:
        for i in range(0, len(ids), 20):
            f.write(" ".join(str(t) for t in ids[i:i + 20]) + "\n")
    print("wrote tests/data/bpe_stress.ids: %d ids for %d bytes" % (len(ids), len(stress)))
    cases = byte_cases(stress)
    with open("tests/data/bpe_cases.txt", "w") as f:
        for c in cases:
            f.write("%s\t%s\n" % (c.hex(), " ".join(str(t) for t in enc._encode_bytes(c))))
    print("wrote tests/data/bpe_cases.txt: %d cases" % len(cases))
    check_shards(enc)


# ---- fuzz

PALETTE = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 4 + list("0123456789") * 2 +
           list(".,;:!?-_()[]{}<>/\\\"#$%&*+=@^`|~") + ["'"] * 12 + ["s", "t", "re", "ve", "m", "ll", "d", "S", "LL"] * 3 +
           [" "] * 30 + ["\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2003", "\u3000",
                         "\u2028", "\u200b", "\ufeff", "\u1680"] * 2 +
           list("αβγδεζηθΣάέίόύώжщёЯ") + list("مرحبا١٢٣۴۵") + list("नमस्ते१२३") + list("你好世界日本語カタカナひらがな한국어") +
           ["\u0301", "\u0308", "\u0323", "\u093f", "\u0e31", "\u200d", "\ufe0f", "\u20e3"] * 2 +
           ["\U0001F44D", "\U0001F3FD", "\U0001F468", "\U0001F469", "\U0001F1EF", "\U0001F600", "\u2764"] +
           list("½²³ⅫⅣ①₁４５٣४৫๑") + list("€£¥₹§¶«»—–…∀∈ℝ→⇒☺★©®™"))


def random_text(rng, n):
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.85:
            out.append(rng.choice(PALETTE))
        elif r < 0.95:
            out.append(rng.choice(PALETTE) * rng.randint(2, 12))  # runs
        else:
            cp = rng.randint(0x80, 0x10FFFF)
            if not 0xD800 <= cp <= 0xDFFF:
                out.append(chr(cp))
    return "".join(out)


def tptrain_encode(tptrain, data):
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
        path = f.name
    try:
        r = subprocess.run([tptrain, "--encode", path, "--format", "ids"], capture_output=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        sys.exit("tptrain --encode failed (exit %d): %s" % (r.returncode, r.stderr.decode(errors="replace")))
    return [int(t) for t in r.stdout.split()]


def fuzz(enc, tptrain, rounds, seed):
    rng = random.Random(seed)
    total = 0
    for k in range(rounds):
        text = random_text(rng, rng.randint(1, 20000)).encode("utf-8")
        inputs = [text]
        if k % 2:  # bytes that are not UTF-8 somewhere after the start
            at = rng.randint(0, len(text))
            inputs.append(text[:at] + bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 3))) + text[at:])
        for data in inputs:
            want = enc._encode_bytes(data)
            got = tptrain_encode(tptrain, data)
            total += len(want)
            if got != want:
                i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                print("round %d (seed %d): id %d differs: tptrain %s, tiktoken %s; text around it: %r" %
                      (k, seed, i, got[max(0, i - 3):i + 4], want[max(0, i - 3):i + 4],
                       enc.decode_bytes(want[max(0, i - 8):i + 8])))
                return 1
    print("fuzz: %d rounds, %d ids, all equal to tiktoken's" % (rounds, total))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("write")
    f = sub.add_parser("fuzz")
    f.add_argument("--tptrain", required=True)
    f.add_argument("--rounds", type=int, default=20)
    f.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    enc = gpt2()
    if args.cmd == "write":
        write(enc)
        return 0
    return fuzz(enc, args.tptrain, args.rounds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
