"""How close to each BENCH.md floor plain memory traffic of the same size gets (GPU only).

    python3 benchmarks/copy_reach.py [case ...]      # default: every BENCH.md case

The floor of a case is its minimum bytes over the bandwidth of a 1 GiB device copy. A smaller
transfer, timed as the benchmark times everything (do_bench: median, L2 flushed before each call,
which leaves L2 full of dirty lines), does not reach that bandwidth: launch latency, the ramp up
and down of a short kernel and the write-back of the flush's lines all weigh more. This times, at
each case's byte counts, the simplest kernels with the op's traffic pattern:

  - forward: a device copy moving the forward's minimum bytes (one read stream, one write stream);
  - backward: torch.add(a, b, out=c) moving the backward's minimum bytes (x and dy read, dx
    written: two read streams, one write stream);

and prints their time as a share of the floor next to modnorm's ops (`torch.ops.modnorm.fwd` /
`.bwd`, as benchmarks/op_times.py times them). modnorm's share over the simple kernel's share is
how much of the reachable speed it takes.
"""

from __future__ import annotations

import argparse

import torch

import modnorm  # noqa: F401  (loads the ops)
from modnorm.bench import GPU_CASES, copy_bandwidth, make_inputs, min_bytes, time_gpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="BENCH.md case names (default: all)")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="copy bandwidth in GB/s")
    args = parser.parse_args()
    known = [c.name for c in GPU_CASES]
    for name in args.cases:
        if name not in known:
            parser.error(f"unknown case {name!r}; choose from {known}")
    ops = torch.ops.modnorm
    bw = args.bandwidth * 1e9 if args.bandwidth > 0 else copy_bandwidth("cuda", time_gpu)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    print(f"{'case':10s} {'copy fwd':>9s} {'modnorm fwd':>12s} {'add bwd':>9s} {'modnorm bwd':>12s}  (% of floor)")
    for case in GPU_CASES:
        if args.cases and case.name not in args.cases:
            continue
        x, w, s, h = make_inputs(case, "cuda", requires_grad=False)
        fwd_bytes, bwd_bytes = min_bytes(case, x, w, s, h)
        _, rstd = ops.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama")
        dy = torch.randn_like(x)
        mask = [True, w is not None, s is not None, h is not None]
        t_fwd = time_gpu(lambda: ops.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama"))
        t_bwd = time_gpu(lambda: ops.bwd(dy, x, rstd, w, s, h, 0.0, 1.0, "llama", mask))
        del x, w, s, h, dy, rstd
        src = torch.empty(fwd_bytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        t_copy = time_gpu(lambda: dst.copy_(src))
        del src, dst
        n = bwd_bytes // 3 // 2  # bf16 elements per tensor
        a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn_like(a)
        c = torch.empty_like(a)
        t_add = time_gpu(lambda: torch.add(a, b, out=c))
        del a, b, c

        def share(nbytes, t):
            return f"{100 * nbytes / bw / t:5.1f}%"

        print(
            f"{case.name:10s} {share(fwd_bytes, t_copy):>9s} {share(fwd_bytes, t_fwd):>12s} "
            f"{share(bwd_bytes, t_add):>9s} {share(bwd_bytes, t_bwd):>12s}",
            flush=True,
        )


if __name__ == "__main__":
    main()
