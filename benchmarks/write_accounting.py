"""How /proc/PID/io's write_bytes counts 4 KB page writes, against what reaches the disk.

    python benchmarks/write_accounting.py [--dir DIR] [--device vda] [--writes 2000]

Writes 4 KB at random page-aligned offsets of a 200 MB file, then the same number sequentially, each
batch followed by fsync, and prints write_bytes / bytes written and the block device's sectors written
(/sys/block/DEV/stat, machine-wide: run it on an idle machine) / bytes written. On a kernel whose page
cache uses large folios, dirtying 4 KB charges the whole folio to write_bytes, so scattered page writes
(a WAL checkpoint of random pages) count many times what the disk receives. docs/performance.md
("Upgrade I/O") uses this to read bench_migration's figures.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

PAGE = 4096
FILE_BYTES = 200 << 20


def write_bytes() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["write_bytes"])


def device_bytes(device: str) -> int:
    return int(Path(f"/sys/block/{device}/stat").read_text().split()[6]) * 512


def measure(fd: int, offsets: list[int], device: str) -> tuple[float, float]:
    os.fsync(fd)
    os.sync()
    before_io, before_device = write_bytes(), device_bytes(device)
    for offset in offsets:
        os.pwrite(fd, b"x" * PAGE, offset)
    os.fsync(fd)
    os.sync()
    written = len(offsets) * PAGE
    return (write_bytes() - before_io) / written, (device_bytes(device) - before_device) / written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where the scratch file goes (default: the temp directory)")
    parser.add_argument("--device", default="vda", help="the block device under it, as in /sys/block")
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = Path(directory) / "pages.bin"
        path.write_bytes(os.urandom(FILE_BYTES))
        fd = os.open(path, os.O_RDWR)
        try:
            pages = FILE_BYTES // PAGE
            scattered = [random.randrange(pages) * PAGE for _ in range(args.writes)]
            in_order = [page * PAGE for page in range(args.writes)]
            print(f"kernel {os.uname().release}; {args.writes} writes of 4 KB, fsync after each pass")
            for label, offsets in (("random pages", scattered), ("consecutive pages", in_order)):
                charged, device = measure(fd, offsets, args.device)
                print(f"{label:>18}: write_bytes {charged:5.2f}x the bytes written, device {device:5.2f}x")
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
