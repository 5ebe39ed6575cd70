#!/usr/bin/env python3
"""Markdown report of benches/remote.sh's samples (results.tsv): medians,
ratios snapmount / peer, snapmount against the link's measured rate, and
every sample.

usage: report.py RESULTS.tsv [NA.txt]
"""
import re
import statistics
import sys
from collections import defaultdict

TOOLS = {"snapmount": "snapmount", "qsd": "qemu-storage-daemon (http, readahead 1 MiB)",
         "qsd-ra0": "qemu-storage-daemon (http, readahead 0)",
         "hexz": "curl + hexz mount", "curl": "curl"}


def load(path):
    header, samples = [], defaultdict(list)
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        if line.startswith("#"):
            header.append(line[1:].strip())
            continue
        metric, tool, rep, value = line.split("\t")
        samples[(metric, tool)].append(value)
    return header, samples


def med(samples, metric, tool):
    vals = samples.get((metric, tool), [])
    nums = [float(v) for v in vals if v != "n/a"]
    if not nums:
        return "n/a" if vals else None
    return statistics.median(nums)


def fmt(v, digits=0):
    if v is None:
        return "–"
    if v == "n/a":
        return "n/a"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if isinstance(a, float) and isinstance(b, float) and b:
        return f"{a / b:.2f}x"
    return "–" if a is None or b is None else "n/a"


def main():
    header, s = load(sys.argv[1])
    out = []
    p = out.append
    p("# snapmount over HTTP: remote-read benchmark")
    p("")
    for h in header:
        p(f"- {h}")
    p("")

    link = med(s, "link_rate", "curl")
    disk_mib = med(s, "disk_bytes", "-")
    disk_mib = disk_mib / 2**20 if isinstance(disk_mib, float) else None
    p("## The link")
    p("")
    p("| measure | value |")
    p("|---|---|")
    p(f"| curl, 256 MiB download (MiB/s) | {fmt(link, 1)} |")
    p(f"| small request on a kept-alive connection: time to first byte (ms) | {fmt(med(s, 'link_rtt', 'curl'), 1)} |")
    p(f"| small request on a new connection (handshake + request, ms) | {fmt(med(s, 'link_rtt_new', 'curl'), 1)} |")
    p(f"| small request, kept-alive, without the delay proxy (ms) | {fmt(med(s, 'link_rtt_direct', 'curl'), 2)} |")
    p("")

    p("## Comparison (medians)")
    p("")
    p("| metric | snapmount | peer | peer's value | snapmount / peer | snapmount % of link |")
    p("|---|---|---|---|---|---|")

    def pct(v):
        if isinstance(v, float) and isinstance(link, float):
            return f"{v / link * 100:.0f}%"
        return "n/a" if v == "n/a" else "–"

    sm, q = med(s, "seq", "snapmount"), med(s, "seq", "qsd")
    p(f"| seq 1 MiB O_DIRECT, cold, qcow2 zstd (MiB/s of disk) | {fmt(sm, 1)} | {TOOLS['qsd']} | {fmt(q, 1)} | {ratio(sm, q)} | {pct(sm)} |")
    # The most a reader can get: every stored byte fetched once at the link's rate.
    m = re.search(r"img\.qcow2 (\d+) bytes", " ".join(header))
    if m and disk_mib and isinstance(link, float):
        ceiling = link * disk_mib / (int(m.group(1)) / 2**20)
        p(f"| seq: ceiling, the image's bytes once at the link's rate (MiB/s of disk) | {fmt(sm, 1)} | ceiling | {fmt(ceiling, 1)} | {ratio(sm, ceiling)} | |")

    def wire(tool):
        v, mib = med(s, "seq", tool), med(s, "seq_mib", tool)
        if isinstance(v, float) and isinstance(mib, float) and disk_mib:
            return mib / (disk_mib / v)
        return "n/a" if v == "n/a" else None

    ws, wq = wire("snapmount"), wire("qsd")
    p(f"| seq: bytes on the wire during the pass (MiB/s) | {fmt(ws, 1)} | {TOOLS['qsd']} | {fmt(wq, 1)} | {ratio(ws, wq)} | {pct(ws)} |")
    for m, what in (("seq_gets", "GETs per pass"), ("seq_mib", "MiB fetched per pass")):
        a, b = med(s, m, "snapmount"), med(s, m, "qsd")
        p(f"| seq: {what} | {fmt(a)} | {TOOLS['qsd']} | {fmt(b)} | {ratio(a, b)} | |")
    a, b = med(s, "rand4", "snapmount"), med(s, "rand4", "qsd")
    p(f"| rand 4 KiB O_DIRECT, 4 threads, cold, qcow2 zstd (IOPS) | {fmt(a)} | {TOOLS['qsd']} | {fmt(b)} | {ratio(a, b)} | |")
    a, b = med(s, "rand4", "snapmount"), med(s, "rand4", "qsd-ra0")
    p(f"| rand 4 KiB O_DIRECT, 4 threads, cold (IOPS) | {fmt(a)} | {TOOLS['qsd-ra0']} | {fmt(b)} | {ratio(a, b)} | |")
    for m, what in (("rand4_lat", "mean"), ("rand4_p50", "median"), ("rand4_p99", "99th percentile")):
        for tool in ("qsd", "qsd-ra0"):
            a, b = med(s, m, "snapmount"), med(s, m, tool)
            p(f"| rand: {what} read latency (ms) | {fmt(a, 1)} | {TOOLS[tool]} | {fmt(b, 1)} | {ratio(a, b)} | |")
    for tool in ("qsd", "qsd-ra0"):
        a, b = med(s, "rand4_mib", "snapmount"), med(s, "rand4_mib", tool)
        p(f"| rand: MiB fetched in the run | {fmt(a)} | {TOOLS[tool]} | {fmt(b)} | {ratio(a, b)} | |")
    a, b = med(s, "ttfb", "snapmount"), med(s, "ttfb", "hexz")
    p(f"| HEXZ LZ4: from nothing to the first 4 KiB (ms; lower is better) | {fmt(a, 1)} | {TOOLS['hexz']} | {fmt(b, 1)} | {ratio(a, b)} | |")
    a, b = med(s, "ttfb_mib", "snapmount"), med(s, "ttfb_mib", "hexz")
    p(f"| HEXZ: MiB fetched until then | {fmt(a, 1)} | {TOOLS['hexz']} | {fmt(b, 1)} | {ratio(a, b)} | |")
    a, b = med(s, "cache2", "snapmount"), med(s, "cache1", "snapmount")
    p(f"| --cache-dir: second mount's seq 1 MiB O_DIRECT, page cache dropped (MiB/s) | {fmt(a, 1)} | snapmount's first mount (cold cache dir) | {fmt(b, 1)} | {ratio(a, b)} | {pct(a)} |")
    for m, what in (("cache2_gets", "GETs"), ("cache2_heads", "HEADs"), ("cache2_mib", "MiB fetched")):
        p(f"| --cache-dir: {what} during the second mount | {fmt(med(s, m, 'snapmount'))} | | | | |")
    p(f"| --cache-dir: size of the cache dir after the first pass (MiB) | {fmt(med(s, 'cache_dir_mib', 'snapmount'))} | | | | |")
    p("")
    p("Ratios are snapmount / peer (for time to first byte and latency, lower is better, so "
      "below 1 favours snapmount). \"% of link\" is against the curl download rate above; "
      "the disk's MiB/s can exceed it because the image is compressed.")
    p("")

    p("## All samples")
    p("")
    p("| metric | tool | samples |")
    p("|---|---|---|")
    for (metric, tool), vals in sorted(s.items()):
        p(f"| {metric} | {tool} | {', '.join(vals)} |")

    if len(sys.argv) > 2:
        seen, lines = set(), []
        for line in open(sys.argv[2]):
            key = line.split("#")[0].strip()
            if line.strip() and key not in seen:
                seen.add(key)
                lines.append(line.strip())
        if lines:
            p("")
            p("## n/a: why (first repetition)")
            p("")
            for line in lines:
                p(f"- {line}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
