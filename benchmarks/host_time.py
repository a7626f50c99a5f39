"""Host time of one eager call of modnorm's forward, on a tiny input (CPU or GPU).

    python3 benchmarks/host_time.py [--device cpu|cuda] [--tag TEXT]

Prints the median over 9 rounds of 5000 back-to-back calls, in microseconds per call, of:
no input requiring grad; inputs requiring grad under torch.no_grad (what the benchmark's "host us"
column times); inputs requiring grad with the graph recorded; and torch.ops.modnorm.fwd itself.
On a CPU the tiny kernel adds well under a microsecond, so the figures are the binding's cost.
"""

from __future__ import annotations

import argparse

import torch

import modnorm
from modnorm.bench import host_time_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = args.device
    x, s, h = torch.randn(1, 1, 8, device=dev), torch.randn(1, 8, device=dev), torch.randn(1, 8, device=dev)
    xg, sg, hg = (t.clone().requires_grad_() for t in (x, s, h))
    f = modnorm.modulated_rms_norm

    def per_call_us(fn, grad):
        return host_time_us(fn, dev, batches=9, reps=5000, grad=grad)

    plain = per_call_us(lambda: f(x, None, s, h), grad=True)
    no_grad = per_call_us(lambda: f(xg, None, sg, hg), grad=False)
    recorded = per_call_us(lambda: f(xg, None, sg, hg), grad=True)
    op = per_call_us(lambda: torch.ops.modnorm.fwd(x, None, s, h, 1e-6, 0.0, 1.0, "llama"), grad=False)
    print(f"{args.tag:8s} host us per call ({dev}): no grad inputs {plain:.2f}; grad inputs under no_grad "
          f"{no_grad:.2f}; graph recorded {recorded:.2f}; torch.ops.modnorm.fwd {op:.2f}")


if __name__ == "__main__":
    main()
