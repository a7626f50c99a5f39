"""Where modnorm's forward+backward time goes, kernel by kernel (GPU only).

    python3 benchmarks/kernel_breakdown.py [case ...]      # default: every BENCH.md case

Runs the benchmark's forward+backward step (torch.autograd.grad against every input) under
torch.profiler, each step after an L2 flush as triton's do_bench does, and prints per case the
median duration of each kernel of the step and of the step's span on the GPU (first kernel start
to last kernel end), against the BENCH.md floors at the copy bandwidth measured as the benchmark
measures it (or given by --bandwidth, GB/s read + write, which skips measuring it). The gap between the span and the kernels'
sum is the time the GPU sat between kernels.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import modnorm
from modnorm.bench import GPU_CASES, copy_bandwidth, make_inputs, min_bytes, time_gpu


def short_name(name: str) -> str:
    """The kernel's function name, without its template arguments and parameters."""
    base = name.split("(")[0]
    base = base.split("<")[0]
    return base.split("::")[-1].replace("void ", "").strip()


def step_kernels(case, steps: int):
    x, w, s, h = make_inputs(case, "cuda")
    dy = torch.randn_like(x)
    grads_of = [t for t in (x, w, s, h) if t is not None]
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def step():
        y = modnorm.modulated_rms_norm(x, w, s, h, in_place=False)
        torch.autograd.grad(y, grads_of, dy)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    # Split the trace at the flushes: each flush's fill kernel starts a step.
    per_step, current = [], None
    for e in kernels:
        if "fill" in e.name.lower() and e.time_range.elapsed_us() > 20:
            current = []
            per_step.append(current)
        elif current is not None:
            current.append(e)
    return [s for s in per_step if s], (x, w, s, h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bandwidth", type=float, default=0.0,
                    help="copy bandwidth, GB/s (default: measured, as the benchmark does)")
    args = ap.parse_args(argv)
    names = args.cases or [c.name for c in GPU_CASES]
    # (The old fixed default, an H200's 4220 GB/s, put every share on an H100 ~29% low.)
    bw = args.bandwidth * 1e9 if args.bandwidth > 0 else copy_bandwidth("cuda", time_gpu)
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    for case in GPU_CASES:
        if case.name not in names:
            continue
        steps, inputs = step_kernels(case, args.steps)
        fwd_b, bwd_b = min_bytes(case, *inputs)
        durations = defaultdict(list)
        spans = []
        for s in steps:
            seen = defaultdict(int)
            for e in s:
                key = short_name(e.name)
                seen[key] += 1
                if seen[key] > 1:
                    key = f"{key}#{seen[key]}"
                durations[key].append(e.time_range.elapsed_us())
            spans.append(s[-1].time_range.end - s[0].time_range.start)
        span = statistics.median(spans)
        total = sum(statistics.median(v) for v in durations.values())
        floor = (fwd_b + bwd_b) / bw * 1e6
        print(f"{case.name}: step span {span:.1f} us (kernels {total:.1f}, between {span - total:.1f});"
              f" f+b floor {floor:.1f} us ({floor / span:.0%} of it); fwd floor {fwd_b / bw * 1e6:.1f},"
              f" bwd floor {bwd_b / bw * 1e6:.1f}")
        for key, v in durations.items():
            print(f"  {key:40s} {statistics.median(v):8.1f} us  (x{len(v)})")


if __name__ == "__main__":
    main()
