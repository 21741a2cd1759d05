#!/usr/bin/env python3
# hf_shard.py SRC.safetensors OUT_DIR N [--prefix P]: splits a safetensors file into N shards the way
# transformers' save_pretrained does (model-0000K-of-0000N.safetensors + model.safetensors.index.json),
# optionally renaming every tensor with a prefix (e.g. "transformer."). Standard library only.
import json, os, struct, sys

src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prefix = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--prefix" else ""
blob = open(src, "rb").read()
hn = struct.unpack("<Q", blob[:8])[0]
hdr = json.loads(blob[8:8 + hn])
meta = hdr.pop("__metadata__", {})
names = sorted(hdr)
os.makedirs(out, exist_ok=True)
weight_map = {}
for k in range(n):
    part = names[k::n]
    fname = "model-%05d-of-%05d.safetensors" % (k + 1, n)
    h, datas, off = {"__metadata__": meta}, [], 0
    for name in part:
        a, b = hdr[name]["data_offsets"]
        raw = blob[8 + hn + a:8 + hn + b]
        h[prefix + name] = {"dtype": hdr[name]["dtype"], "shape": hdr[name]["shape"], "data_offsets": [off, off + len(raw)]}
        datas.append(raw)
        off += len(raw)
        weight_map[prefix + name] = fname
    text = json.dumps(h).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(out, fname), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(datas))
with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": len(blob) - 8 - hn}, "weight_map": weight_map}, f, indent=2)
