#!/usr/bin/env python3
"""Writes SIZE bytes of deterministic, half-compressible data to PATH.

Each 64 KiB block (one qcow2 cluster, hexz's nominal block) holds:
  32 KiB pseudo-random bytes (incompressible, like already-compressed files),
  16 KiB of log-like text that mentions the block number (compresses ~4-8x),
  16 KiB of zeros (free space inside a filesystem).
So every cluster is compressed and must be decompressed on read, and the
whole file compresses to roughly half. The seed is fixed: every run, every
machine gets the same bytes.

usage: gen_data.py PATH SIZE_BYTES
"""
import random
import sys

BLOCK = 64 << 10
WORDS = ("kernel systemd sshd nginx postgres cron dhclient audit block eth0 "
         "started stopped accepted failed connection session user root opened "
         "closed request GET POST 200 404 500 timeout retry cache hit miss").split()


def text(rng, block_no, n):
    out = bytearray()
    line = 0
    while len(out) < n:
        words = " ".join(rng.choices(WORDS, k=8))
        out += f"Jan 01 00:{block_no % 60:02d}:{line % 60:02d} host {words} blk={block_no} line={line}\n".encode()
        line += 1
    return bytes(out[:n])


def main():
    path, size = sys.argv[1], int(sys.argv[2])
    rng = random.Random(0x5EED)
    zeros = bytes(BLOCK // 4)
    with open(path, "wb") as f:
        for block_no in range(size // BLOCK):
            f.write(rng.randbytes(BLOCK // 2))
            f.write(text(rng, block_no, BLOCK // 4))
            f.write(zeros)
        rest = size % BLOCK
        if rest:
            f.write(rng.randbytes(rest))


if __name__ == "__main__":
    main()
