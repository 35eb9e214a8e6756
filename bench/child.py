"""One measurement in a fresh Python process, for the runners whose measurement must not share a process with
anything else (bench/ortcpu.py, bench/llamacpp.py): the parent calls `run_child`, the child's `main` is
`child_main`, and one JSON line on stdout carries the result back."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def run_child(module: str, target: str, threads: int, prompt: str, new_tokens: int, timeout: float = 900) -> dict:
    """`python -m module target --threads ... --prompt ... --new-tokens ...` with OpenBLAS pinned to one thread
    (as in bench/generate.py); its last stdout line parsed as JSON. A child killed by a signal (e.g. SIGILL from a
    wheel built for CPU features this machine lacks) or failing otherwise raises RuntimeError saying so."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", module, target, "--threads", str(threads),
                          "--prompt", prompt, "--new-tokens", str(new_tokens)],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode < 0 or out.returncode > 128:
        sig = -out.returncode if out.returncode < 0 else out.returncode - 128
        raise RuntimeError(f"the child died with {signal.Signals(sig).name} (e.g. a wheel built for CPU "
                           f"instructions this machine lacks) {out.stderr[-300:].strip()}")
    if out.returncode != 0:
        raise RuntimeError(f"{module} {Path(target).name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(measure: Callable[[str, int, str, int], dict], doc: str | None, target: str) -> int:
    """The child's command line: `target --threads N --prompt TEXT --new-tokens N` -> one JSON line."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(target)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(measure(getattr(args, target), args.threads, args.prompt, args.new_tokens)))
    return 0
