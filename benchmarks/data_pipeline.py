"""The text data pipeline at corpus scale: preprocessing throughput and memory, cached starts, batch reads.

The corpora are this machine's own Python sources: every `*.py` file under the interpreter's
standard library folder and the environment's site-packages, each file a run of blank-line
separated paragraphs (documents). The files are written in a shuffled order (seeded by the pass
number), pass after pass with a fresh order, until the corpus reaches its size; so a 1 GB corpus
repeats each file about twice, and the split (by a hash of each document) keeps every copy on one
side. Each measurement runs in a fresh process, so its peak RSS (VmHWM) is its own:

- build: `data=text_files` with the default settings (WordPiece of 8,192 tokens trained on the
  first 64 MB, seq_len 128) from an empty cache: wall time, MB/s, peak RSS;
- cached start: the same call again, now reading the cache;
- batch reads: a loop of `train_batch(step, 128, seed=0)` over the memory-mapped token file, for
  the small and the large corpus: private (anonymous) and file-backed resident memory, ms/batch.

    python benchmarks/data_pipeline.py                     # 1 GB and 100 MB corpora (about 12 min here)
    python benchmarks/data_pipeline.py --large-mb 200 --small-mb 20 --steps 200   # a quick look

Everything is generated under a temporary folder in /tmp and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, command_line, machine

BATCH = 128
SETTINGS = dict(seq_len=128)  # the rest as conf/data/text_files.yaml: the builder's defaults


def python_sources() -> list[Path]:
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "purelib")}
    files = {p.resolve() for root in roots for p in root.rglob("*.py") if p.is_file()}
    return sorted(files)


def make_corpus(path: Path, megabytes: float) -> dict:
    """Python sources in a shuffled file order, pass after pass, until `megabytes` are written."""
    files, written, passes = python_sources(), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 1e6:
            order = files[:]
            random.Random(passes).shuffle(order)
            passes += 1
            for file in order:
                try:
                    text = file.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                out.write(text + "\n\n")
                written += len(text.encode()) + 2
                if written >= megabytes * 1e6:
                    break
    return {"files": len(files), "passes": passes, "bytes": path.stat().st_size}


# --- what runs in the child processes -------------------------------------------------------------


def status() -> dict:
    """Resident memory of this process, in MB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def child_build(corpus: str, cache: str) -> dict:
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("sift_cli").addHandler(handler)
    logging.getLogger("sift_cli").setLevel(logging.INFO)
    from sift_cli.data.text import text_files

    imported = status()
    start = time.perf_counter()
    data = text_files(corpus, cache_dir=cache, **SETTINGS)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "describe": data.describe(), "meta": data.meta, "log": records,
            "after_imports": imported, "end": status()}


def child_read(corpus: str, cache: str, steps: int) -> dict:
    import torch

    from sift_cli.data.text import text_files

    torch.set_num_threads(1)  # as in a DataLoader worker, where torch sets one thread

    data = text_files(corpus, cache_dir=cache, **SETTINGS)
    before, peak_anon, peak_file = status(), 0.0, 0.0
    start = time.perf_counter()
    for step in range(steps):
        data.train_batch(step, BATCH, seed=0)
        if step % 25 == 0 or step == steps - 1:
            now = status()
            peak_anon, peak_file = max(peak_anon, now["RssAnon"]), max(peak_file, now["RssFile"])
    seconds = time.perf_counter() - start
    return {"ms_per_batch": 1e3 * seconds / steps, "before": before, "peak_anon": peak_anon,
            "peak_file": peak_file, "end": status(), "num_train": data.num_train,
            "token_file_mb": (data.folder / "train.bin").stat().st_size / 1e6}


def in_child(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    if out.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


# --- the report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large-mb", type=float, default=1000)
    parser.add_argument("--small-mb", type=float, default=100)
    parser.add_argument("--steps", type=int, default=1000, help="train_batch calls per read measurement")
    parser.add_argument("--out", default=str(RESULTS / "data_pipeline.md"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        result = child_build(*rest) if mode == "build" else child_read(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return

    began, load = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="sift-data-bench-", dir="/tmp"))
    try:
        corpora, made = {}, {}
        for name, mb in (("large", args.large_mb), ("small", args.small_mb)):
            corpora[name] = work / f"corpus-{mb:g}mb.txt"
            made[name] = make_corpus(corpora[name], mb)
            print(f"{name}: {made[name]}", flush=True)
        cache = str(work / "cache")
        build, build_wall = in_child("build", str(corpora["large"]), cache)
        print("build", build_wall, build["log"], flush=True)
        warm, warm_wall = in_child("build", str(corpora["large"]), cache)
        print("cached", warm_wall, warm["seconds"], flush=True)
        small_build, _ = in_child("build", str(corpora["small"]), cache)
        reads = {name: in_child("read", str(corpora[name]), cache, str(args.steps))[0] for name in ("small", "large")}
        print("reads", reads, flush=True)
        shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    size_mb = made["large"]["bytes"] / 1e6
    small, large = reads["small"], reads["large"]
    ratio = large["peak_anon"] / small["peak_anon"]
    lines = [
        "# Text data pipeline at corpus scale",
        "",
        f"- Command: `{command_line()}` ({(time.perf_counter() - began) / 60:.1f} min)",
        f"- Machine: {machine()}; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: other work runs beside the benchmark)",
        f"- Corpora: the {made['large']['files']:,} Python files under the interpreter's lib folder and "
        "site-packages, written in a shuffled file order pass after pass until the size is reached "
        f"({made['large']['passes']} passes for {size_mb:,.0f} MB, {made['small']['passes']} for "
        f"{made['small']['bytes'] / 1e6:,.0f} MB); documents are blank-line separated paragraphs",
        "- Settings: `data=text_files` defaults (WordPiece 8,192 trained on the first 64 MB, val_fraction "
        f"0.05), seq_len 128, batches of {BATCH}; each measurement in a fresh process",
        "",
        "## Preprocessing (empty cache)",
        "",
        "| corpus | documents | tokens | token files | wall | MB/s (whole call) | peak RSS (VmHWM) "
        "| RSS after imports |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in (("small", small_build), ("large", build)):
        meta = result["meta"]
        tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
        documents = meta["train"]["documents"] + meta["val"]["documents"]
        mb = made[name]["bytes"] / 1e6
        lines.append(f"| {mb:,.0f} MB | {documents:,} | {tokens:,} | {meta['dtype']}, "
                     f"{tokens * np.dtype(meta['dtype']).itemsize / 1e6:,.0f} MB | {result['seconds']:.0f} s | "
                     f"{mb / result['seconds']:.1f} | {result['end']['VmHWM']:,.0f} MB | "
                     f"{result['after_imports']['VmRSS']:,.0f} MB |")
    lines += [
        "",
        f"The library's own log line: `{[r for r in build['log'] if r.startswith('tokenised')][0]}` "
        "(tokenising alone, after the tokenizer was trained on its 64 MB sample). Target: peak RSS under 2 GB. "
        f"Peak RSS, {size_mb:,.0f} MB / {made['small']['bytes'] / 1e6:,.0f} MB corpus: "
        f"{build['end']['VmHWM'] / small_build['end']['VmHWM']:.2f} (what a build holds is the tokenizer's "
        "sample while it trains and one 1 MB batch of text while it tokenises, whatever the corpus size).",
        "",
        f"Cached start (the same call again, another process): {warm['seconds']:.2f} s in the call, "
        f"{warm_wall:.1f} s for the whole process with its imports.",
        "",
        f"## Reading training batches ({args.steps:,} calls of `train_batch(step, {BATCH}, seed=0)`, one torch "
        "thread as in a DataLoader worker)",
        "",
        "| corpus | training sequences | train.bin | ms/batch | private RSS before | peak private RSS (RssAnon) "
        "| peak file-backed RSS (RssFile) | peak RSS (VmHWM) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("small", "large"):
        r = reads[name]
        lines.append(f"| {made[name]['bytes'] / 1e6:,.0f} MB | {r['num_train']:,} | {r['token_file_mb']:,.0f} MB | "
                     f"{r['ms_per_batch']:.2f} | {r['before']['RssAnon']:,.0f} MB | {r['peak_anon']:,.0f} MB | "
                     f"{r['peak_file']:,.0f} MB | {r['end']['VmHWM']:,.0f} MB |")
    lines += [
        "",
        f"Private memory while reading batches, large / small corpus: {ratio:.3f} (target: within 10%). "
        f"File-backed memory is {small['before']['RssFile']:,.0f} MB before the first batch (shared libraries: "
        "torch, transformers) plus the pages of the memory-mapped token file that the batches touched "
        f"(+{small['peak_file'] - small['before']['RssFile']:,.0f} MB and "
        f"+{large['peak_file'] - large['before']['RssFile']:,.0f} MB): page cache, shared by every process that "
        "maps the file (ranks, DataLoader workers) and given back by the kernel under memory pressure; it is "
        "bounded by the file's size and by how much of it the batches read, so VmHWM, which counts it, "
        "grows with the number of batches read on a large corpus.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
