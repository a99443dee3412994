"""Bandwidth of decomm's fused CUDA weighted-sum kernel.

    out = w_self * x + sum_{j<k} w_j * r_j

is memory-bound: it reads k + 1 tensors and writes one, so its useful traffic is
``(k + 2) * n * element_size`` bytes. This script times the fused kernel
(``decomm._C_cuda.weighted_sum``) and the unfused torch sequence a Python
implementation would run (``out = x * w_self``, then ``out.add_(r_j * w_j)`` per
neighbour), both on the same tensors in the same run, and reports

* the fused kernel's achieved bandwidth (useful bytes / time) as a fraction of the
  device's theoretical peak (memory clock x bus width, from the CUDA runtime) and of a
  measured device-to-device copy (``torch`` ``copy_``), the practical ceiling;
* the speedup over the unfused sequence (same useful bytes, so the time ratio).

Target: >= 80% of the measured device-to-device copy bandwidth (the practical ceiling
of a memory-bound kernel; an H200 copies about 4.3 TB/s counting read and write) for
tensors of >= 64 MB. The theoretical peak is reported beside it.

Timing: CUDA events around ``--inner`` back-to-back calls, the median of ``--repeat``
such batches, after warm-up. Prints a table and writes ``benchmarks/results/gpu.md``.

Usage::

    python benchmarks/gpu_kernels.py [--sizes-mb 0.004,0.0625,1,16,64,256] [--k 1,2,4,8]
        [--dtypes float32,bfloat16,float16,float64] [--repeat 7] [--inner 10] [--out PATH]

Needs a CUDA device and decomm built with its CUDA extension; without them it exits
with a message saying which is missing.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
TARGET_FRACTION = 0.80
TARGET_MIN_MB = 64.0


def _require_cuda():
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = ("torch has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        sys.exit(f"gpu_kernels: {why}; this benchmark needs a GPU (nothing was measured)")
    import decomm

    if not decomm.built_with_cuda():
        sys.exit("gpu_kernels: decomm was built without its CUDA extension (decomm._C_cuda); "
                 "rebuild with a CUDA torch and nvcc (pip install -e . or "
                 "DECOMM_WITH_CUDA=1) - nothing was measured")
    import decomm._C_cuda as ext

    return ext


def _time_ms(fn: Callable[[], object], repeat: int, inner: int) -> float:
    """Median milliseconds per call of ``fn`` (CUDA events, ``inner`` calls per batch)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _copy_gbps(repeat: int, inner: int) -> float:
    """Measured device-to-device copy bandwidth (read + write) on 256 MB."""
    n = (256 << 20) // 4
    src = torch.empty(n, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), repeat, inner)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def verdict(rows: list[dict], copy_gbps: float) -> str:
    """The target's verdict: the lowest ``pct_copy`` among tensors >= TARGET_MIN_MB."""
    big = [r for r in rows if r["mb"] >= TARGET_MIN_MB]
    if not big or copy_gbps <= 0:
        return f"Target could not be judged (no size >= {TARGET_MIN_MB:.0f} MB measured)."
    worst = min(big, key=lambda r: r["pct_copy"])
    met = worst["pct_copy"] >= 100 * TARGET_FRACTION
    return (f"Target: fused kernel >= {TARGET_FRACTION:.0%} of the measured copy bandwidth "
            f"({copy_gbps:.0f} GB/s) for tensors >= {TARGET_MIN_MB:.0f} MB: "
            f"{'**met**' if met else '**not met**'} (lowest: {worst['pct_copy']:.0f}% at "
            f"{worst['dtype']}, k={worst['k']}, {worst['mb']:.0f} MB).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="0.004,0.0625,1,16,64,256",
                    help="per-tensor sizes in MB (1 MB = 2^20 bytes)")
    ap.add_argument("--k", default="1,2,4,8", help="neighbour counts")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16,float64")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    args = ap.parse_args(argv)
    ext = _require_cuda()

    dev = torch.cuda.current_device()
    name = torch.cuda.get_device_name(dev)
    peak = float(ext.memory_peak_gbps(dev)) or None
    copy = _copy_gbps(args.repeat, args.inner)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]

    rows = []
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        for mb in sizes:
            n = max(1, int(mb * (1 << 20)) // es)
            for k in ks:
                x = torch.randn(n, device="cuda").to(dtype)
                rs = [torch.randn(n, device="cuda").to(dtype) for _ in range(k)]
                ws = [1.0 / (k + 1)] * k
                w0 = 1.0 / (k + 1)
                out = torch.empty_like(x)

                def fused(x=x, rs=rs, ws=ws, w0=w0, out=out):
                    ext.weighted_sum(x, w0, rs, ws, out=out)

                def unfused(x=x, rs=rs, ws=ws, w0=w0):
                    acc = x * w0
                    for r, w in zip(rs, ws):
                        acc.add_(r * w)
                    return acc

                t_f = _time_ms(fused, args.repeat, args.inner)
                t_u = _time_ms(unfused, args.repeat, args.inner)
                useful = (k + 2) * n * es
                gbps = useful / (t_f * 1e-3) / 1e9
                rows.append({
                    "dtype": str(dtype).replace("torch.", ""), "mb": n * es / (1 << 20), "k": k,
                    "fused_us": t_f * 1e3, "unfused_us": t_u * 1e3, "gbps": gbps,
                    "pct_peak": 100 * gbps / peak if peak else None,
                    "pct_copy": 100 * gbps / copy, "speedup": t_u / t_f,
                })
                del x, rs, out
        torch.cuda.empty_cache()

    header = (f"{'dtype':>8} {'MB/tensor':>10} {'k':>3} {'fused us':>10} {'unfused us':>11} "
              f"{'fused GB/s':>11} {'% peak':>7} {'% copy':>7} {'speedup':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        pk = f"{r['pct_peak']:.0f}" if r["pct_peak"] is not None else "n/a"
        lines.append(f"{r['dtype']:>8} {r['mb']:>10.3f} {r['k']:>3} {r['fused_us']:>10.1f} "
                     f"{r['unfused_us']:>11.1f} {r['gbps']:>11.0f} {pk:>7} "
                     f"{r['pct_copy']:>7.0f} {r['speedup']:>7.2f}x")
    table = "\n".join(lines)
    summary = verdict(rows, copy)
    print(f"GPU: {name}; theoretical peak {peak or 'unknown'} GB/s; measured copy "
          f"{copy:.0f} GB/s")
    print(table)
    print(summary)

    cmd = "python benchmarks/gpu_kernels.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])
    md = [
        "# Fused CUDA weighted-sum kernel: bandwidth",
        "",
        f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        f"GPU: **{name}** (device {dev}); theoretical memory bandwidth "
        f"{f'{peak:.0f} GB/s' if peak else 'unknown'}; measured device-to-device copy "
        f"{copy:.0f} GB/s. torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Python {platform.python_version()}.",
        "",
        "`fused` is `decomm._C_cuda.weighted_sum` (one pass: reads k + 1 tensors, writes one);"
        " `unfused` is `out = x * w0; out.add_(r_j * w_j)` per neighbour in torch. GB/s counts "
        "the useful bytes `(k + 2) * n * element_size` for both, so `speedup` is the time "
        "ratio. Times: median of the batches, CUDA events.",
        "",
        summary,
        "",
        "```",
        table,
        "```",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
