#!/usr/bin/env python3
"""prepare_data.py: turn UTF-8 text into tptrain token shards (GPT-2 BPE, llm.c's format).

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count, zeros)
followed by the tokens as little-endian uint16. Each input file is one document and starts with
the <|endoftext|> token, as GPT-2 was trained. The first --val-fraction of the tokens (or the
first --val-tokens) becomes the validation shard and the rest the training shard, so validation
text never appears in training.

    python3 scripts/prepare_data.py --input corpus.txt --out-prefix data/corpus --val-fraction 0.1

writes data/corpus_train.bin and data/corpus_val.bin. Point the config's data paths at them.

--llmc tokenizes as llm.c's dev/data/tinyshakespeare.py does: each file is cut at every blank
line ("\n\n") into sections, each section is a document preceded by <|endoftext|> and keeps the
"\n\n" it was cut at (all but the file's last section), and the first 32,768 tokens become the
validation shard. On Tiny Shakespeare this writes llm.c's tiny_shakespeare_{val,train}.bin token
for token (data/tinyshakespeare_llmc_*.bin, docs/text.md):

    python3 scripts/prepare_data.py --llmc --input input.txt --out-prefix data/tinyshakespeare_llmc

Tokenizing needs tiktoken (pip install tiktoken); without network access for its first download,
the gpt2 encoding is built from data/gpt2_merges.txt (OpenAI's vocab.bpe, checked by the SHA-256
tiktoken pins). numpy is used when present, else the standard library writes the files.
"""
import argparse
import array
import hashlib
import os
import struct
import sys

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
MAX_TOKEN = 65535  # tokens are stored as uint16
LLMC_VAL_TOKENS = 32768  # llm.c's Tiny Shakespeare validation split
# The SHA-256 tiktoken pins for OpenAI's GPT-2 vocab.bpe, of which data/gpt2_merges.txt is a copy.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")


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
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network for the first download: the same ranks from data/
        return offline_gpt2(tiktoken, e)


def offline_gpt2(tiktoken, why):
    """tiktoken's gpt2 encoding built from the shipped copy of OpenAI's vocab.bpe, as
    tiktoken_ext.openai_public.gpt2 builds it from the downloaded one."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public
    merges = os.path.join(DATA_DIR, "gpt2_merges.txt")
    try:
        with open(merges, "rb") as f:
            ok = hashlib.sha256(f.read()).hexdigest() == VOCAB_BPE_SHA256
    except OSError:
        ok = False
    if not ok:
        fail(f"tiktoken cannot download the GPT-2 vocabulary ({why}), and {merges} is missing or is not "
             f"OpenAI's vocab.bpe; run once with network access")
    ranks = data_gym_to_mergeable_bpe_ranks(merges, os.path.join(DATA_DIR, "gpt2_vocab.json"),
                                            vocab_bpe_hash=VOCAB_BPE_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def read_text(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        fail(f"{path}: cannot read: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text (byte offset {e.start}); convert it first, e.g. with iconv")


def documents(text, llmc):
    """The documents of one file: the whole text, or llm.c's blank-line sections (its script cuts
    at "\n\n" and adds the "\n\n" back to every section but the last)."""
    if not llmc:
        return [text]
    sections = text.split("\n\n")
    return [s + "\n\n" for s in sections[:-1]] + sections[-1:]


def tokenize(paths, enc, llmc=False):
    eot = enc.eot_token
    tokens = []
    for path in paths:
        for doc in documents(read_text(path), llmc):
            tokens.append(eot)
            # encode_ordinary: text that happens to contain "<|endoftext|>" stays plain text.
            tokens.extend(enc.encode_ordinary(doc))
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


def split(tokens, val_fraction, val_tokens=None):
    """Returns (train, val). val is a prefix of the stream (val_tokens long, or val_fraction of
    it); None when that is 0."""
    if val_tokens is None and val_fraction == 0:
        return tokens, None
    n_val = val_tokens if val_tokens is not None else int(round(len(tokens) * val_fraction))
    what = f"--val-tokens {val_tokens}" if val_tokens is not None else f"--val-fraction {val_fraction}"
    if n_val < 2 or len(tokens) - n_val < 2:
        fail(f"{len(tokens)} tokens are too few to split with {what}: "
             f"each side needs at least 2; give more text or a smaller validation part")
    return tokens[n_val:], tokens[:n_val]


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize UTF-8 text into tptrain/llm.c token shards "
                                "(GPT-2 BPE).")
    p.add_argument("--input", required=True, nargs="+",
                   help="UTF-8 text file(s); each is one document, preceded by <|endoftext|>")
    p.add_argument("--out-prefix", required=True,
                   help="output prefix: writes PREFIX_train.bin and PREFIX_val.bin")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the tokens, taken from the start, for validation "
                   "(0 writes no val shard; default 0.1)")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="exactly this many tokens, taken from the start, for validation "
                   f"(default with --llmc: {LLMC_VAL_TOKENS})")
    p.add_argument("--llmc", action="store_true",
                   help="llm.c's Tiny Shakespeare preparation: a document per blank-line-separated "
                   f"section, the first {LLMC_VAL_TOKENS} tokens for validation")
    args = p.parse_args(argv)
    if args.val_fraction is not None and args.val_tokens is not None:
        fail("--val-fraction and --val-tokens both choose the validation size; give one")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        fail(f"--val-fraction {args.val_fraction}: must be in [0, 1)")
    if args.val_tokens is not None and args.val_tokens < 0:
        fail(f"--val-tokens {args.val_tokens}: must be >= 0")
    val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    val_tokens = args.val_tokens
    if args.llmc and val_tokens is None and args.val_fraction is None:
        val_tokens = LLMC_VAL_TOKENS
    if val_tokens == 0:
        val_tokens, val_fraction = None, 0.0

    enc = load_encoder()
    tokens = tokenize(args.input, enc, args.llmc)
    train, val = split(tokens, val_fraction, val_tokens)
    write_shard(args.out_prefix + "_train.bin", train)
    if val is not None:
        write_shard(args.out_prefix + "_val.bin", val)


if __name__ == "__main__":
    main()
