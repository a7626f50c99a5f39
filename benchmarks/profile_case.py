"""Runs modnorm's forward and backward on BENCH.md cases a few times: a small target for ncu.

    ncu --clock-control none -k regex:forward --launch-count 2 python3 benchmarks/profile_case.py flux
"""

import sys

import torch

import modnorm
from modnorm.bench import GPU_CASES, make_inputs

names = sys.argv[1:] or ["ltx2b-t2v"]
for case in GPU_CASES:
    if case.name not in names:
        continue
    x, w, s, h = make_inputs(case, "cuda")
    dy = torch.randn_like(x)
    grads_of = [t for t in (x, w, s, h) if t is not None]
    for _ in range(3):
        y = modnorm.modulated_rms_norm(x, w, s, h, in_place=False)
        torch.autograd.grad(y, grads_of, dy)
    torch.cuda.synchronize()
    print(case.name, "ok")
