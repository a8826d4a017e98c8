"""Run a command with CPU-bound processes beside it: the standard the Serve tests must meet (issue 36).

    python tests/with_load.py [--busy 2] -- python -m pytest -q -k serve      # what `make test-serve-loaded` runs

Researchers run Serve beside their trainings. Ray Serve's start-up checks failed on this 2-core machine with two
one-thread trainings beside it (the proxy missed its 5 s readiness check three times and the controller shut down), so
a Serve change is done when `make test-serve-loaded` passes. Each busy process is one Python thread spinning on
arithmetic (a training's CPU use without its memory); they end with the command, whose exit status this returns.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time


def spin() -> None:
    x = 0
    while True:  # one core's worth of work until terminated
        x = (x * 1103515245 + 12345) % 2147483648


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the command (default 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    busy = [mp.get_context("spawn").Process(target=spin, daemon=True) for _ in range(args.busy)]
    for proc in busy:
        proc.start()
    t0 = time.perf_counter()
    print(f"[with_load] {args.busy} CPU-bound processes beside: {' '.join(command)} ({os.cpu_count()} CPUs)",
          flush=True)  # fmt: skip
    try:
        code = subprocess.call(command)
    finally:
        for proc in busy:
            proc.terminate()
        for proc in busy:
            proc.join(10)
    print(f"[with_load] exit {code} after {time.perf_counter() - t0:.0f} s with {args.busy} busy processes", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
