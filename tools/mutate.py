"""Long run of the bundle mutation suite (the CI runs 1,200 mutants; this runs as many as you ask).

    python tools/mutate.py --n 20000 [--scheme int4-g32] [--seed 1]

Builds a tiny bundle, then loads and decodes every mutant; prints counts and any mutant that was accepted,
crashed with something other than BundleError, or took longer than 5 s. Exit code 1 on any such mutant.
"""
import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import tiny  # noqa: E402
from converter.bundle import BuildOptions, load, write_bundle  # noqa: E402
from converter.errors import BundleError  # noqa: E402
from converter.loaders import open_checkpoint  # noqa: E402
from mutants import mutants  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--scheme", default="int4-g32")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        tiny.write_hf(tmp / "src")
        src = tmp / "bundle"
        write_bundle(open_checkpoint(tmp / "src"), src, BuildOptions(scheme=args.scheme, chunk_symbols=4096))
        counts, bad = Counter(), []
        t0 = time.perf_counter()
        for label, change in mutants(src, args.n, args.seed):
            work = tmp / "m"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            for name, data in change.items():
                (work / name).unlink() if data is None else (work / name).write_bytes(data)
            t = time.perf_counter()
            try:
                for _ in load(work).decode_initializers():
                    pass
                counts["accepted"] += 1
                bad.append(f"accepted: {label}")
            except BundleError:
                counts["rejected"] += 1
            except Exception as e:  # noqa: BLE001
                counts["crashed"] += 1
                bad.append(f"crashed: {label}: {type(e).__name__}: {e}")
            if time.perf_counter() - t > 5:
                counts["slow"] += 1
                bad.append(f"slow: {label}")
        print(f"{args.n} mutants of a tiny {args.scheme} bundle in {time.perf_counter() - t0:.0f} s: {dict(counts)}")
        for line in bad[:50]:
            print(line)
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
