"""`python -m bench [NAME ...] [--smoke] [--out DIR]`: run the benchmarks, print a markdown table
for each, write DIR/<name>.json (default bench/results/).

Each benchmark runs in this process one after another (the ones that measure memory start their
own child processes per configuration). A failing benchmark is reported and the others still run;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

from bench.common import BENCHMARKS, RESULTS_DIR, Result, machine


def module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def run_one(name: str, smoke: bool, work: Path, out: Path) -> Result:
    """Run one benchmark at full (or smoke) size. `work` is scratch space shared by the
    benchmarks of one invocation (the tiny model is made once); each removes its own large
    files when it is done."""
    mod = module(name)
    sizes = mod.SMOKE if smoke else mod.FULL
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: Result = mod.run(sizes, work, out)
    result.seconds = time.perf_counter() - start
    result.settings["smoke"] = smoke
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"some of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the smoke test's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    names = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cpu_cores']} cores, {info['ram_gib']} GiB RAM, "
        f"torch {info['torch']}, device {info['device']}",
        flush=True,
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    total = time.perf_counter()
    failed = []
    try:
        for name in names:
            print(f"\n## {name}\n", flush=True)
            try:
                result = run_one(name, args.smoke, work, args.out)
            except Exception:
                traceback.print_exc()
                failed.append(name)
                continue
            path = result.write(args.out, info)
            print(f"{result.title} ({result.seconds:.0f} s)\n", flush=True)
            print(result.table())
            for note in result.notes:
                print(f"\n- {note}")
            print(f"\n-> {path}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nbench: {len(names) - len(failed)} of {len(names)} benchmarks in "
        f"{time.perf_counter() - total:.0f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
