#!/usr/bin/env python3
"""plot_loss.py: tptrain JSON-lines logs to a PNG of train and validation loss against step.

Usage: plot_loss.py LOG.jsonl [LOG.jsonl ...] [-o loss.png] [--labels A,B,...] [--title TEXT]
                    [--log-y] [--smooth N]

Every log becomes one run on the plot: its train loss as a line and its validation loss as
markers in the same colour. The top axis converts steps to tokens (global batch of the first
run, read from the log: tok_per_s * ms). A resumed run appends to its log and repeats the steps
after its checkpoint; the last record of a step wins. A last line cut short by a killed run is
skipped. Needs matplotlib (python3 -m pip install matplotlib).
"""
import argparse
import json
import os
import sys


def die(msg):
    print(f"plot_loss.py: {msg}", file=sys.stderr)
    sys.exit(2)


def read_log(path):
    """Returns (train {step: loss}, val {step: loss}, tokens per step or None)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        die(f"{path}: cannot read: {e.strerror}")
    train, val, batch = {}, {}, []
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if no == len(lines):  # a run killed mid-write
                continue
            die(f"{path}:{no}: not a JSON record; is this a tptrain log.jsonl file?")
        if not isinstance(rec, dict):
            die(f"{path}:{no}: not a JSON object")
        kind, step, loss = rec.get("kind"), rec.get("step"), rec.get("loss")
        if kind not in ("train", "val") or not isinstance(step, int) or not isinstance(loss, (int, float)):
            continue
        if kind == "train":
            train[step] = float(loss)
            if isinstance(rec.get("tok_per_s"), (int, float)) and isinstance(rec.get("ms"), (int, float)):
                batch.append(rec["tok_per_s"] * rec["ms"] / 1000.0)
        else:
            val[step] = float(loss)
    if not train and not val:
        die(f"{path}: no train or val records")
    tokens = None
    if batch:
        batch.sort()
        tokens = round(batch[len(batch) // 2])
    return train, val, tokens


def smooth(values, n):
    """Trailing mean over n points (n <= 1: unchanged)."""
    if n <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= n:
            acc -= values[i - n]
        out.append(acc / min(i + 1, n))
    return out


def main(argv):
    ap = argparse.ArgumentParser(description="Plot tptrain JSON-lines logs (train/val loss vs step).")
    ap.add_argument("logs", nargs="+", help="log.jsonl files, one run each")
    ap.add_argument("-o", "--out", default="loss.png", help="output PNG (default loss.png)")
    ap.add_argument("--labels", help="comma-separated run names (default: the file names)")
    ap.add_argument("--title", default="tptrain loss", help="plot title")
    ap.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    ap.add_argument("--smooth", type=int, default=1, help="trailing mean of the train loss over N steps")
    a = ap.parse_args(argv)

    labels = a.labels.split(",") if a.labels else [os.path.basename(p) for p in a.logs]
    if len(labels) != len(a.logs):
        die(f"--labels names {len(labels)} runs but {len(a.logs)} logs were given")
    runs = [read_log(p) for p in a.logs]

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        die("matplotlib is not installed; install it with `python3 -m pip install matplotlib`")

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((train, val, _), label) in enumerate(zip(runs, labels)):
        c = colors[i % len(colors)]
        if train:
            steps = sorted(train)
            ax.plot(steps, smooth([train[s] for s in steps], a.smooth), color=c, lw=1.2,
                    label=f"{label} train")
        if val:
            steps = sorted(val)
            ax.plot(steps, [val[s] for s in steps], color=c, marker="o", ms=4, ls="--", lw=0.8,
                    label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if a.log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(a.title)
    ax.legend(fontsize=8)
    tokens = runs[0][2]
    if tokens:
        # Twin axis: tokens seen, for the first run's global batch.
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens, lambda t: t / tokens))
        top.set_xlabel(f"tokens ({labels[0]}: {tokens} per step)")
    fig.tight_layout()
    try:
        fig.savefig(a.out)
    except OSError as e:
        die(f"{a.out}: cannot write: {e.strerror}")
    print(f"wrote {a.out}: {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
