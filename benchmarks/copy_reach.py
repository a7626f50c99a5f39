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

import torch

import modnorm  # noqa: F401  (loads the ops)
from modnorm.bench import time_gpu
from op_times import parse_args, time_ops  # this folder (run as a script)


def main() -> None:
    _, bw, cases = parse_args(__doc__)
    print(f"{'case':10s} {'copy fwd':>9s} {'modnorm fwd':>12s} {'add bwd':>9s} {'modnorm bwd':>12s}  (% of floor)")
    for case in cases:
        fwd_bytes, bwd_bytes, t_fwd, t_bwd = time_ops(case)
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
