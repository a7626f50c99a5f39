"""Runs one provider's forward (and backward) on BENCH.md cases a few times: a small target for ncu.

    ncu --clock-control none -k regex:forward --launch-count 2 python3 benchmarks/profile_case.py flux
    ncu --clock-control none -k regex:rms --launch-skip 2 --launch-count 1 \
        python3 benchmarks/profile_case.py --provider "Liger fused" --forward-only ltx13b

--provider takes a name of the benchmark's table (modnorm, "Liger fused", torch.compile, ...), so
a peer's kernel is profiled on the same inputs as modnorm's.
"""

import argparse

import torch

from modnorm.bench import GPU_CASES, compiled_eager, make_inputs, provider_fns

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("cases", nargs="*", default=["ltx2b-t2v"])
parser.add_argument("--provider", default="modnorm")
parser.add_argument("--forward-only", action="store_true")
parser.add_argument("--reps", type=int, default=3)
args = parser.parse_args()

for case in GPU_CASES:
    if case.name not in args.cases:
        continue
    x, w, s, h = make_inputs(case, "cuda", requires_grad=not args.forward_only)
    fns = provider_fns(case, "cuda")
    if args.provider not in fns:
        parser.error(f"--provider {args.provider!r} is not available here; choose from {sorted(fns)}")
    fn = fns[args.provider]
    if fn == "compile":
        fn = compiled_eager()
    dy = torch.randn_like(x)
    grads_of = [t for t in (x, w, s, h) if t is not None]
    for _ in range(args.reps):
        y = fn(x, w, s, h)
        if not args.forward_only:
            torch.autograd.grad(y, grads_of, dy)
    torch.cuda.synchronize()
    print(case.name, args.provider, "ok")
