"""The forward and backward ops alone, per BENCH.md case, against their floors (GPU only).

    python3 benchmarks/op_times.py [case ...]      # default: every BENCH.md case

Times `torch.ops.modnorm.fwd` and `torch.ops.modnorm.bwd` (every gradient the case has) with the
benchmark's timer (do_bench: median, L2 flushed before each call). Without autograd's host cost,
a backward's own time shows even on a host that makes the benchmark's forward+backward
host-bound. Each is printed with its BENCH.md floor share at the measured copy bandwidth
(--bandwidth, GB/s read + write, skips measuring it). Environment switches of the CUDA backend
(MODNORM_BACKWARD_KERNEL, MODNORM_BWD_RING_STAGES, ...) apply, for A/B runs in one process.
"""

from __future__ import annotations

import argparse

import torch

import modnorm  # noqa: F401  (loads the ops)
from modnorm.bench import GPU_CASES, copy_bandwidth, make_inputs, min_bytes, time_gpu


def parse_args(description: str, tag: bool = False) -> tuple[argparse.Namespace, float, list]:
    """Case names, --bandwidth (and --tag); returns the arguments, the copy bandwidth in bytes/s
    (measured unless given) and the chosen BENCH.md cases."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="BENCH.md case names (default: all)")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="copy bandwidth in GB/s")
    if tag:
        parser.add_argument("--tag", default="", help="a label printed on every line")
    args = parser.parse_args()
    known = [c.name for c in GPU_CASES]
    for name in args.cases:
        if name not in known:
            parser.error(f"unknown case {name!r}; choose from {known}")
    bw = args.bandwidth * 1e9 if args.bandwidth > 0 else copy_bandwidth("cuda", time_gpu)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    return args, bw, [c for c in GPU_CASES if not args.cases or c.name in args.cases]


def time_ops(case) -> tuple[int, int, float, float]:
    """(forward bytes, backward bytes, forward seconds, backward seconds) of the case's ops."""
    ops = torch.ops.modnorm
    x, w, s, h = make_inputs(case, "cuda", requires_grad=False)
    fwd_bytes, bwd_bytes = min_bytes(case, x, w, s, h)
    _, rstd = ops.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama")
    dy = torch.randn_like(x)
    mask = [True, w is not None, s is not None, h is not None]
    t_fwd = time_gpu(lambda: ops.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama"))
    t_bwd = time_gpu(lambda: ops.bwd(dy, x, rstd, w, s, h, 0.0, 1.0, "llama", mask))
    return fwd_bytes, bwd_bytes, t_fwd, t_bwd


def main() -> None:
    args, bw, cases = parse_args(__doc__, tag=True)
    for case in cases:
        fwd_bytes, bwd_bytes, t_fwd, t_bwd = time_ops(case)
        print(
            f"{case.name:10s} {args.tag:8s} fwd {t_fwd * 1e6:8.1f} us {100 * fwd_bytes / bw / t_fwd:5.1f}%"
            f"   bwd {t_bwd * 1e6:8.1f} us {100 * bwd_bytes / bw / t_bwd:5.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
