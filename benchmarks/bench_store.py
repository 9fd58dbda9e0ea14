"""Incremental saves and lazy comparison in the state store, against rewriting everything.

A store of ``--n`` float32 tensors of ``--mib`` MiB each (default 100 x 1 MiB) goes through:

- ``first save``: :meth:`StateStore.save` into an empty directory (hash, serialise, write, fsync);
- ``save, 1 changed``: the same dict of tensors with one changed (every tensor is fingerprinted with
  xxh3, only the changed one blake2b-hashed; one file and
  the manifest are written);
- ``save, 1 changed (lazy dict)``: ``d = store.lazy(); d[name] = new; store.save(d)`` -- the 99
  unchanged entries are lazy tensors of the store, so only the new tensor is hashed and written;
- ``save, none changed``: the same dict of tensors again (every tensor fingerprinted, nothing written);
- ``safetensors save_file (all)``: the baseline -- one ``safetensors.torch.save_file`` of every tensor
  (what rewriting the whole file costs, without fsync);
- ``lazy compare (1 changed)``: a fresh ``StateStore`` on the directory, ``lazy()`` and ``lazy == t``
  for every fresh tensor (only the manifest is read: object files read is counted and must be 0);
- ``load + compare``: reading every tensor back (verified) and ``torch.equal`` -- what comparing costs
  without lazy tensors.

Time: median of ``--repeats`` runs (each save row starts from the state it needs). Bytes: what the
save wrote (object files plus manifest). Writes a table and, with ``--png``, a bar chart.

Run: ``.venv/bin/python benchmarks/bench_store.py [--n 100] [--mib 1] [--repeats 5] [--png bench_store.png]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from minterp_tl.store import StateStore


def _tensors(n: int, mib: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    numel = int(mib * 2**20) // 4
    return {f"blocks.{i}.hook_resid_post": torch.randn(numel, generator=g) for i in range(n)}


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to make the stores (default: a temp dir)")
    parser.add_argument("--png", default=None, help="write a bar chart here")
    args = parser.parse_args()

    base = _tensors(args.n, args.mib, 0)
    changed = dict(base)
    key = next(iter(base))
    changed[key] = base[key] + 1.0
    total = sum(t.numel() * t.element_size() for t in base.values())
    work = Path(tempfile.mkdtemp(prefix="bench_store-", dir=args.dir))
    rows: dict[str, tuple[float, int | None]] = {}
    try:
        first_bytes = []

        def first() -> float:
            root = work / "first"
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            report = StateStore(root).save(base)
            first_bytes.append(report.bytes_written)
            return time.perf_counter() - start

        rows["first save"] = (_median(first, args.repeats), first_bytes[-1])

        one_bytes = []

        def one_changed() -> float:
            store = StateStore(work / "first")
            store.save(base)  # start from the base version (no-op when it is already there)
            start = time.perf_counter()
            report = store.save(changed)
            one_bytes.append(report.bytes_written)
            assert report.written == [key], report.written
            return time.perf_counter() - start

        rows["save, 1 changed"] = (_median(one_changed, args.repeats), one_bytes[-1])

        lazy_bytes = []

        def one_changed_lazy() -> float:
            store = StateStore(work / "first")
            store.save(base)
            start = time.perf_counter()
            d = store.lazy()
            d[key] = changed[key]
            report = store.save(d)
            lazy_bytes.append(report.bytes_written)
            assert report.written == [key], report.written
            return time.perf_counter() - start

        rows["save, 1 changed (lazy dict)"] = (_median(one_changed_lazy, args.repeats), lazy_bytes[-1])

        none_bytes = []

        def none_changed() -> float:
            store = StateStore(work / "first")
            start = time.perf_counter()
            report = store.save(changed)
            none_bytes.append(report.bytes_written)
            return time.perf_counter() - start

        rows["save, none changed"] = (_median(none_changed, args.repeats), none_bytes[-1])

        def full_rewrite() -> float:
            start = time.perf_counter()
            save_file(base, str(work / "all.safetensors"))
            return time.perf_counter() - start

        full_time = _median(full_rewrite, args.repeats)
        rows["safetensors save_file (all)"] = (full_time, (work / "all.safetensors").stat().st_size)

        StateStore(work / "first").save(base)
        reads = []

        def lazy_compare() -> float:
            store = StateStore(work / "first")
            start = time.perf_counter()
            lazy = store.lazy()
            differ = [name for name, t in changed.items() if not lazy[name] == t]
            elapsed = time.perf_counter() - start
            assert differ == [key], differ
            reads.append(store.files_read)
            return elapsed

        rows["lazy compare (1 changed)"] = (_median(lazy_compare, args.repeats), None)

        def load_compare() -> float:
            store = StateStore(work / "first")
            start = time.perf_counter()
            loaded = store.load()
            differ = [name for name, t in changed.items() if not torch.equal(loaded[name], t)]
            elapsed = time.perf_counter() - start
            assert differ == [key]
            return elapsed

        rows["load + compare"] = (_median(load_compare, args.repeats), None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.n} float32 tensors x {args.mib:g} MiB = {total / 2**20:.0f} MiB, median of {args.repeats}, "
        f"{torch.get_num_threads()} threads; object files read by the lazy compare: {max(reads)}"
    )
    first_time = rows["first save"][0]
    print("| operation | time (s) | x first save | bytes written | % of first save's bytes |")
    print("|---|---|---|---|---|")
    for name, (t, nbytes) in rows.items():
        written = "" if nbytes is None else f"{nbytes:,}"
        share = "" if nbytes is None else f"{100 * nbytes / rows['first save'][1]:.2f}"
        print(f"| {name} | {t:.3f} | {t / first_time:.3f} | {written} | {share} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from minterp_tl._files import save_png

        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = list(rows)
        ax.barh(names[::-1], [rows[n][0] for n in names[::-1]], color="tab:blue")
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"StateStore: {args.n} x {args.mib:g} MiB float32")
        fig.tight_layout()
        save_png(fig, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
