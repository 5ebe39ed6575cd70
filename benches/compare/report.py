#!/usr/bin/env python3
"""Turns the raw samples of benches/compare.sh into one markdown report.

usage: report.py RESULTS.tsv CACHE_BYTES > results.md

RESULTS.tsv has one sample per line: metric, image, tool, repetition, value.
The report has three parts:
  1. the comparison table: per metric and image, each tool's median, and
     snapmount's ratio to each peer (snapmount / peer; for the zero FUSE
     filesystem, snapmount as a percentage of it);
  2. the targets, each met or missed, with the numbers behind the verdict;
  3. every sample, so the noise can be judged.
"""
import collections
import statistics
import sys

METRICS = [
    # key, label, unit, higher is better
    ("seq_direct", "seq 1 MiB O_DIRECT, cold", "MB/s", True),
    ("seq_direct_hot", "seq 1 MiB O_DIRECT, image in host page cache", "MB/s", True),
    ("seq_buf", "seq 1 MiB buffered, cold", "MB/s", True),
    ("seq_warm", "seq 1 MiB buffered, warm re-reads (new open each)", "MB/s", True),
    ("rand1", "rand 4 KiB O_DIRECT, 1 thread", "IOPS", True),
    ("rand4", "rand 4 KiB O_DIRECT, 4 threads", "IOPS", True),
    ("rss_hwm", "daemon peak RSS (VmHWM), rand 4 threads", "MiB", False),
    ("rss_anon", "daemon peak anon RSS (sampled), rand 4 threads", "MiB", False),
    ("export", "export to raw, flushed (qemu-img: -t writeback), image cached", "MB/s", True),
    ("export_nosync", "export to raw, not flushed (--no-sync; qemu-img: default), image cached", "MB/s", True),
    ("mount_cold", "mount to first 4 KiB read, caches dropped", "ms", False),
    ("mount_warm", "mount to first 4 KiB read, warm", "ms", False),
]
IMAGES = ["qcow2-raw", "qcow2-zlib", "qcow2-zstd", "qcow2-luks", "hexz-lz4", "hexz-zstd",
          "sparse-1T", "snapshots-500", "chain-4", "hexz-thin"]
# Images whose reads are measured (the others are for mount times).
READ_IMAGES = IMAGES[:6]
PEERS = [("qsd", "qemu-storage-daemon"), ("hexz", "hexz mount"), ("qemuimg", "qemu-img convert")]
# Baselines that do not depend on the image: measured next to qcow2-raw,
# shown on every throughput row.
BASELINES = [("zerofs", "zero FUSE fs"), ("rawfile", "host file, no FUSE")]
THROUGHPUT = {"seq_direct", "seq_direct_hot", "seq_buf", "seq_warm", "rand1", "rand4"}


def load(path):
    samples, notes = collections.defaultdict(list), []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                notes.append(line[1:].strip())
                continue
            if not line.strip():
                continue
            metric, image, tool, _rep, value = line.rstrip("\n").split("\t")
            samples[(metric, image, tool)].append(float(value))
    return samples, notes


def fmt(value, unit):
    if value is None:
        return "–"
    if unit == "IOPS":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.1f}"
    return f"{value:,.0f}"


class Report:
    def __init__(self, samples, cache_bytes):
        self.samples = samples
        self.cache_mib = cache_bytes / (1 << 20)
        self.med = {k: statistics.median(v) for k, v in samples.items()}

    def get(self, metric, image, tool):
        if tool in dict(BASELINES):
            return self.med.get((metric, "-", tool))
        return self.med.get((metric, image, tool))

    def ratio(self, metric, image, peer):
        s, p = self.get(metric, image, "snapmount"), self.get(metric, image, peer)
        return None if s is None or p is None or p == 0 else s / p

    def table(self):
        head = ["metric", "image", "snapmount"] + [n for _, n in PEERS] + [n for _, n in BASELINES] + \
               ["snapmount / QSD", "snapmount / hexz mount", "snapmount / qemu-img", "snapmount % of zero FUSE"]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key, label, unit, _ in METRICS:
            for image in IMAGES:
                if (key, image, "snapmount") not in self.med:
                    continue
                cells = [f"{label} ({unit})", image, fmt(self.get(key, image, "snapmount"), unit)]
                cells += [fmt(self.get(key, image, t), unit) for t, _ in PEERS]
                for t, _ in BASELINES:
                    cells.append(fmt(self.get(key, image, t), unit) if key in THROUGHPUT or t == "zerofs" else "–")
                for t, _ in PEERS:
                    r = self.ratio(key, image, t)
                    cells.append("–" if r is None else f"{r:.2f}x")
                r = self.ratio(key, image, "zerofs")
                cells.append(f"{100 * r:.0f}%" if r is not None and key in THROUGHPUT else "–")
                out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)

    def targets(self):
        rows = []

        def check(name, value, goal, fmt_value, ok):
            if value is None:
                rows.append(f"| {name} | not measured | {goal} | – |")
            else:
                rows.append(f"| {name} | {fmt_value(value)} | {goal} | {'**met**' if ok(value) else '**MISSED**'} |")

        x = lambda v: f"{v:.2f}x"
        pct = lambda v: f"{100 * v:.0f}%"
        # Sequential targets are checked on the cold pass (the official
        # number) and on the pass with the image in the host page cache
        # (the daemon's own speed, without the disk).
        seqs = [("seq_direct", "seq O_DIRECT cold"), ("seq_direct_hot", "seq O_DIRECT, image cached"),
                ("seq_buf", "seq buffered cold")]
        for key, what in seqs[:2]:
            check(f"qcow2-raw {what} vs QSD", self.ratio(key, "qcow2-raw", "qsd"), ">= 1.5x", x, lambda v: v >= 1.5)
            check(f"qcow2-raw {what} vs zero FUSE", self.ratio(key, "qcow2-raw", "zerofs"), ">= 70%", pct, lambda v: v >= 0.7)
        # Issue 14: one copy for uncompressed clusters.
        check("qcow2-raw seq O_DIRECT, image cached vs zero FUSE (issue 14)", self.ratio("seq_direct_hot", "qcow2-raw", "zerofs"),
              ">= 85%", pct, lambda v: v >= 0.85)
        for image in ("qcow2-zstd", "qcow2-zlib", "qcow2-luks"):
            check(f"{image} rand 4 KiB 4 threads vs QSD", self.ratio("rand4", image, "qsd"), ">= 3x", x, lambda v: v >= 3)
            for key, what in seqs:
                check(f"{image} {what} vs QSD", self.ratio(key, image, "qsd"), ">= 1.5x", x, lambda v: v >= 1.5)
        # Issue 14: decode only what is asked; cold reads at disk speed.
        for image in ("qcow2-zstd", "qcow2-zlib"):
            check(f"{image} rand 4 KiB 4 threads vs QSD (issue 14)", self.ratio("rand4", image, "qsd"), ">= 4x", x,
                  lambda v: v >= 4)
            check(f"{image} seq buffered cold vs QSD (issue 14)", self.ratio("seq_buf", image, "qsd"), ">= 2x", x,
                  lambda v: v >= 2)
        # Issue 14: export, against qemu-img convert, flushed and not.
        for image in ("qcow2-raw", "qcow2-zlib", "qcow2-zstd", "qcow2-luks"):
            goal = 1.0 if image in ("qcow2-raw", "qcow2-luks") else 1.5
            for key, what in (("export", "flushed vs qemu-img -t writeback"), ("export_nosync", "--no-sync vs qemu-img")):
                check(f"{image} export, {what}", self.ratio(key, image, "qemuimg"), f">= {goal}x", x,
                      lambda v, g=goal: v >= g)
        for image in ("hexz-lz4", "hexz-zstd"):
            for key, what in seqs:
                check(f"{image} {what} vs hexz mount", self.ratio(key, image, "hexz"), ">= 1.5x", x, lambda v: v >= 1.5)
            check(f"{image} rand 4 KiB 4 threads vs hexz mount", self.ratio("rand4", image, "hexz"), ">= 2x", x, lambda v: v >= 2)
        # Page-cache speed: the same 1 MiB buffered re-read of a file that
        # sits in the page cache, without FUSE. 80% leaves room for noise.
        page = self.get("seq_warm", "-", "rawfile")
        for image in READ_IMAGES:
            s = self.get("seq_warm", image, "snapmount")
            check(f"{image} warm buffered re-read vs host page cache ({fmt(page, 'MB/s')} MB/s)",
                  None if s is None or not page else s / page, ">= 80%", pct, lambda v: v >= 0.8)
        for image in IMAGES[len(READ_IMAGES):]:
            for key, when in (("mount_cold", "caches dropped"), ("mount_warm", "warm")):
                check(f"{image} mount to live, {when}", self.get(key, image, "snapmount"), "< 100 ms",
                      lambda v: f"{v:.1f} ms", lambda v: v < 100)
        limit = self.cache_mib + 64
        for image in READ_IMAGES:
            check(f"{image} peak RSS (VmHWM), cache {self.cache_mib:.0f} MiB", self.get("rss_hwm", image, "snapmount"),
                  f"<= {limit:.0f} MiB", lambda v: f"{v:.0f} MiB", lambda v: v <= limit)
        return "\n".join(["| target | observed | goal | verdict |", "|---|---|---|---|"] + rows)

    def all_samples(self):
        out = ["| metric | image | tool | samples | median |", "|---|---|---|---|---|"]
        for key, label, unit, _ in METRICS:
            for (m, image, tool), values in sorted(self.samples.items()):
                if m == key:
                    out.append(f"| {key} | {image} | {tool} | {', '.join(fmt(v, unit) for v in values)} | "
                               f"{fmt(self.med[(m, image, tool)], unit)} |")
        return "\n".join(out)


def main():
    samples, notes = load(sys.argv[1])
    report = Report(samples, int(sys.argv[2]))
    print("\n".join(f"- {n}" for n in notes) + "\n")
    print("## Comparison (medians)\n")
    print(report.table())
    print("\n## Targets\n")
    print(report.targets())
    print("\n## All samples\n")
    print(report.all_samples())


if __name__ == "__main__":
    main()
