#!/usr/bin/env python3
"""prepare_data.py: turn UTF-8 text into tptrain token shards (GPT-2 BPE, llm.c's format).

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count, zeros)
followed by the tokens as little-endian uint16. Each input file is one document and starts with
the <|endoftext|> token, as GPT-2 was trained. The first --val-fraction of the tokens becomes the
validation shard and the rest the training shard, so validation text never appears in training.

    python3 scripts/prepare_data.py --input corpus.txt --out-prefix data/corpus --val-fraction 0.1

writes data/corpus_train.bin and data/corpus_val.bin. Point the config's data paths at them.
Tokenizing needs tiktoken (pip install tiktoken); numpy is used when present, else the standard
library writes the files.
"""
import argparse
import array
import os
import struct
import sys

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
MAX_TOKEN = 65535  # tokens are stored as uint16


def fail(msg):
    print(f"prepare_data.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load_encoder():
    try:
        import tiktoken
    except ImportError:
        fail("tiktoken is not installed, and it provides the GPT-2 BPE; install it with "
             "'pip install tiktoken' (the first run downloads the GPT-2 vocabulary, so it needs "
             "network access once)")
    return tiktoken.get_encoding("gpt2")


def tokenize(paths, enc):
    eot = enc.eot_token
    tokens = []
    for path in paths:
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            fail(f"{path}: cannot read: {e.strerror}")
        except UnicodeDecodeError as e:
            fail(f"{path}: not UTF-8 text (byte offset {e.start}); convert it first, e.g. with iconv")
        tokens.append(eot)
        # encode_ordinary: text that happens to contain "<|endoftext|>" stays plain text.
        tokens.extend(enc.encode_ordinary(text))
    return tokens


def write_shard(path, tokens):
    """Writes one shard atomically: a crash leaves either the old file or the whole new one."""
    if any(t < 0 or t > MAX_TOKEN for t in tokens):
        fail(f"{path}: a token id does not fit in uint16; this format holds vocabularies up to 65536")
    if len(tokens) >= 2**31:
        fail(f"{path}: {len(tokens)} tokens do not fit one shard's int32 count; split the input")
    tmp = path + ".tmp"
    try:
        import numpy as np
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
        header_bytes = header.tobytes()
        token_bytes = np.asarray(tokens, dtype="<u2").tobytes()
    except ImportError:
        header_bytes = struct.pack(f"<{HEADER_INTS}i", SHARD_MAGIC, SHARD_VERSION, len(tokens),
                                   *([0] * (HEADER_INTS - 3)))
        arr = array.array("H", tokens)
        if sys.byteorder == "big":
            arr.byteswap()
        token_bytes = arr.tobytes()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(header_bytes)
        f.write(token_bytes)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"wrote {path}: {len(tokens)} tokens ({len(header_bytes) + len(token_bytes)} bytes)")


def split(tokens, val_fraction):
    """Returns (train, val). val is a prefix of the stream; None when val_fraction is 0."""
    if val_fraction == 0:
        return tokens, None
    n_val = int(round(len(tokens) * val_fraction))
    if n_val < 2 or len(tokens) - n_val < 2:
        fail(f"{len(tokens)} tokens are too few to split with --val-fraction {val_fraction}: "
             f"each side needs at least 2; give more text or change the fraction")
    return tokens[n_val:], tokens[:n_val]


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize UTF-8 text into tptrain/llm.c token shards "
                                "(GPT-2 BPE).")
    p.add_argument("--input", required=True, nargs="+",
                   help="UTF-8 text file(s); each is one document, preceded by <|endoftext|>")
    p.add_argument("--out-prefix", required=True,
                   help="output prefix: writes PREFIX_train.bin and PREFIX_val.bin")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the tokens, taken from the start, for validation "
                   "(0 writes no val shard; default 0.1)")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        fail(f"--val-fraction {args.val_fraction}: must be in [0, 1)")

    enc = load_encoder()
    tokens = tokenize(args.input, enc)
    train, val = split(tokens, args.val_fraction)
    write_shard(args.out_prefix + "_train.bin", train)
    if val is not None:
        write_shard(args.out_prefix + "_val.bin", val)


if __name__ == "__main__":
    main()
