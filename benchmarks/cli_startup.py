"""Wall time of `tunekit --help` and `tunekit jobs list` (target: <= 0.3 s), median of N runs.

    python benchmarks/cli_startup.py [-n 20]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("-n", type=int, default=20)
args = parser.parse_args()

env = {**os.environ, "TUNEKIT_HOME": tempfile.mkdtemp()}
for argv in (["--help"], ["jobs", "list"]):
    cmd = [sys.executable, "-m", "tunekit.cli.main", *argv]
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(args.n):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    print(f"tunekit {' '.join(argv)}: median {statistics.median(times):.3f} s, max {max(times):.3f} s (n={args.n})")
