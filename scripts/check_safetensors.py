#!/usr/bin/env python3
"""check_safetensors.py: an independent safetensors validator (json + struct only, no torch).

Usage: check_safetensors.py FILE [FILE ...]

For every file it checks the 8-byte header length, the JSON header, every tensor's dtype, shape
and data_offsets, and that the tensors tile the data area exactly (no overlap, gap or trailing
bytes). It then prints, in header order,
    # __metadata__ {"key": "value", ...}        (only when the file has metadata)
    NAME DTYPE [D0,D1,...] SHA256-OF-THE-TENSOR-BYTES
Exits 1 with a one-line message naming the file on the first problem.
"""
import hashlib
import json
import struct
import sys

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}
HEADER_MAX = 100 * 1000 * 1000


class BadFile(Exception):
    pass


def _pairs_no_dupes(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise BadFile(f"key '{k}' appears twice in the header")
        seen[k] = v
    return seen


def _is_uint(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read(path):
    """Returns (metadata dict or None, [(name, dtype, shape, bytes)]) or raises BadFile."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise BadFile(f"file is {len(blob)} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise BadFile(f"header length {n} is larger than the {len(blob) - 8} bytes after it")
    if n < 2 or n > HEADER_MAX:
        raise BadFile(f"header length {n} is implausible")
    raw = blob[8:8 + n]
    if not raw.startswith(b"{"):
        raise BadFile("header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs_no_dupes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadFile(f"malformed header JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadFile("header is not a JSON object")
    data = memoryview(blob)[8 + n:]

    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise BadFile("__metadata__ must be an object of strings")

    tensors = []
    for name, info in header.items():
        where = f"tensor '{name}'"
        if not isinstance(info, dict):
            raise BadFile(f"{where}: entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise BadFile(f"{where}: entry has no \"{key}\"")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise BadFile(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise BadFile(f"{where}: shape must be a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise BadFile(f"{where}: data_offsets must be [begin, end]")
        begin, end = offs
        if begin > end:
            raise BadFile(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        if end > len(data):
            raise BadFile(f"{where}: data_offsets [{begin}, {end}] run past the data area "
                          f"({len(data)} bytes)")
        numel = 1
        for d in shape:
            numel *= d
        need = numel * DTYPE_SIZES[dtype]
        if end - begin != need:
            raise BadFile(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but "
                          f"{dtype} shape {shape} needs {need}")
        tensors.append((name, dtype, shape, begin, end))

    cursor = 0
    prev = None
    for name, _, _, begin, end in sorted(tensors, key=lambda t: (t[3], t[4])):
        if begin < cursor:
            raise BadFile(f"tensor '{name}': data_offsets [{begin}, {end}] overlap tensor '{prev}'")
        if begin > cursor:
            raise BadFile(f"tensor '{name}': bytes [{cursor}, {begin}) of the data area are unclaimed")
        cursor, prev = end, name
    if cursor != len(data):
        raise BadFile(f"{len(data) - cursor} bytes after the last tensor's data")
    return meta, [(name, dtype, shape, bytes(data[b:e])) for name, dtype, shape, b, e in tensors]


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 2
    for path in argv[1:]:
        try:
            meta, tensors = read(path)
        except (OSError, BadFile) as e:
            print(f"check_safetensors.py: {path}: {e}", file=sys.stderr)
            return 1
        if meta is not None:
            print("# __metadata__ " + json.dumps(meta, sort_keys=True))
        for name, dtype, shape, blob in tensors:
            dims = "[" + ",".join(str(d) for d in shape) + "]"
            print(f"{name} {dtype} {dims} {hashlib.sha256(blob).hexdigest()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:  # output piped into head: not an error of the file
        sys.stderr.close()
        sys.exit(0)
