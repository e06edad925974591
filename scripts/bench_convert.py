"""Time and peak memory of `bitft convert` on SmolLM2-135M-Instruct, each run in a fresh process.

    python scripts/bench_convert.py

Rows: Python imports alone (the floor), GGUF -> checkpoint (load, dequantize, save), and a float32
safetensors folder -> checkpoint (shards copied, no tensor loaded), with and without SubLN.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitft.sources import embedded_smollm2


def run(cmd):
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024  # KiB -> MiB on Linux


def main():
    gguf = embedded_smollm2()
    work = Path(tempfile.mkdtemp(prefix="bitft-bench-"))
    try:
        folder = work / "smollm2-fp32"
        # in a child process: a fork inherits the parent's peak RSS, so the parent stays small
        make = "import sys; from bitft.sources import load_gguf; from pathlib import Path; m, t = load_gguf(Path(sys.argv[1])); m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])"
        subprocess.run([sys.executable, "-c", make, gguf, folder], check=True, capture_output=True)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        cli = [sys.executable, "-m", "bitft.cli", "convert"]
        rows = [
            ("imports only (floor)", run([sys.executable, "-c", "import bitft.cli, bitft.convert, transformers"])),
            (f"GGUF Q4_1 ({gguf.stat().st_size / 2**20:.0f} MiB) -> checkpoint", run(cli + [gguf, "-o", work / "a"])),
            (f"fp32 folder ({size:.0f} MiB) -> checkpoint", run(cli + [folder, "-o", work / "b"])),
            ("fp32 folder -> checkpoint, --subln", run(cli + [folder, "-o", work / "c", "--subln"])),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbitft convert, SmolLM2-135M-Instruct, {os.cpu_count()} CPU cores\n")
    print("| conversion | seconds | peak RSS (MiB) |")
    print("|---|---|---|")
    for name, (secs, rss) in rows:
        print(f"| {name} | {secs:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
