"""Seconds from `dlion train microcloud-hetero --engine dist` (6 workers) to its first
training iteration (RESULTS.md section 13).

    python benchmarks/startup_time.py OUT_DIR [--src TREE] [--trace]

The first iteration is taken as the moment the coordinator's first evaluation (due 0.05 s
after the workers' common start) appears in OUT_DIR/metrics.jsonl. `--src TREE` runs the
dlion of another source tree (TREE/src first on PYTHONPATH), e.g. an unpacked older commit,
with this interpreter. `--trace` prints every output line of the command with its time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve() / "src")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from dlion.cli.commands import main; sys.exit(main())",
    ]
    cmd += ["train", "microcloud-hetero", "--engine", "dist", "--set", "train.max_time=2"]
    cmd += ["--set", "train.stop_at_target=false", "--out", str(args.out)]
    cmd += [] if args.trace else ["--quiet"]
    start = time.time()
    output = subprocess.PIPE if args.trace else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    if args.trace:

        def echo() -> None:
            for line in proc.stdout or []:
                print(f"{time.time() - start:6.1f}  {line.rstrip()}", flush=True)

        threading.Thread(target=echo, daemon=True).start()
    first = None
    metrics = args.out / "metrics.jsonl"
    while first is None and (proc.poll() is None or metrics.exists()):
        try:
            if '"event": "eval"' in metrics.read_text():
                first = time.time()
        except OSError:
            pass
        if proc.poll() is not None and first is None:
            break
        time.sleep(0.02)
    proc.wait()
    if first is None:
        sys.exit(f"no evaluation in {metrics} (exit {proc.returncode})")
    print(
        f"first evaluation {first - start:.1f} s after the command "
        f"(exit {proc.returncode}, load {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
