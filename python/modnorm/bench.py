"""modnorm's benchmark: the cases of BENCH.md, every provider side by side, against the floor.

    python -m modnorm.bench                 # on the GPU if there is one, else on the CPU
    python -m modnorm.bench --device cpu    # CPU cases (shrunk to fit a small machine)

Floor of a case = its minimum bytes (each input read once, each output written once) over the
copy bandwidth measured in the same run. Forward and forward+backward (torch.autograd.grad against
every input that requires grad, fixed random dy) are timed per provider; on the GPU with
triton.testing.do_bench (median, L2 flushed), on the CPU as the median of repeated runs.
Writes a markdown table (and on the GPU a PNG plot) into --out, stamped with versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import modnorm
from modnorm.reference import broadcast_modulation, modulated_rms_norm_eager, modulated_rms_norm_f_rms_norm


@dataclasses.dataclass
class Case:
    name: str
    shape: tuple
    weight: bool
    mod: str | None  # per_sample (B, D) | b1d (B, 1, D) | chunk (B, 1, D) views | per_token (B, T, D) | None
    shift: bool = True
    mod_dtype: torch.dtype = torch.bfloat16
    source: str = ""


GPU_CASES = [
    Case("dit-xl", (2, 1024, 1152), False, "per_sample", True, source="DiT-XL/2"),
    Case("ltx2b-t2v", (2, 6144, 2048), False, "chunk", True, source="LTX-Video 2B"),
    Case("ltx2b-i2v", (2, 6144, 2048), False, "per_token", True, source="LTX-Video i2v"),
    Case("ltx13b", (1, 13376, 4096), False, "b1d", True, source="LTX-Video 13B"),
    Case("mochi", (1, 44520, 3072), False, "per_sample", False, source="Mochi"),
    Case("flux", (2, 4608, 3072), True, "b1d", True, source="Flux-sized"),
    Case("wan14b", (1, 32760, 5120), True, "b1d", True, torch.float32, "Wan 14B"),
    Case("wan-token", (1, 32760, 5120), True, "per_token", True, torch.float32, "Wan 2.2 per-token"),
    Case("qk-norm", (221184, 128), True, None, False, source="per-head QK norm"),
]

# The CPU run keeps dit-xl as it is and shrinks the LTX case to a quarter of its tokens.
CPU_CASES = [
    GPU_CASES[0],
    dataclasses.replace(GPU_CASES[1], name="ltx2b-t2v/4", shape=(2, 1536, 2048), source="LTX-Video 2B, T/4"),
]


def make_inputs(case: Case, device, requires_grad=True):
    B, D = case.shape[0], case.shape[-1]
    T = case.shape[1] if len(case.shape) == 3 else 1
    g = requires_grad
    x = torch.randn(case.shape, device=device, dtype=torch.bfloat16, requires_grad=g)
    w = (1 + 0.1 * torch.randn(D, device=device)).to(torch.bfloat16).requires_grad_(g) if case.weight else None
    s = h = None
    if case.mod is not None:
        md = case.mod_dtype
        if case.mod == "chunk":
            proj = (0.1 * torch.randn(B, 1, 6 * D, device=device)).to(md).requires_grad_(g)
            h, s = proj.chunk(6, dim=-1)[:2]
        else:
            shape = {"per_sample": (B, D), "b1d": (B, 1, D), "per_token": (B, T, D)}[case.mod]
            s = (0.1 * torch.randn(shape, device=device)).to(md).requires_grad_(g)
            h = (0.1 * torch.randn(shape, device=device)).to(md).requires_grad_(g)
        if not case.shift:
            h = None
    return x, w, s, h


def min_bytes(case: Case, x, w, s, h):
    """(forward, backward) minimum bytes per BENCH.md."""
    rows = x.numel() // x.shape[-1]
    xb = x.numel() * x.element_size()
    params = sum(t.numel() * t.element_size() for t in (w, s, h) if t is not None)
    fwd = 2 * xb + params + 4 * rows
    bwd = 3 * xb + 4 * rows + 2 * params  # read dy, x, rstd, params; write dx, dparams
    return fwd, bwd


# ---- providers ----------------------------------------------------------------------------------


def provider_fns(case: Case, device):
    eps = 1e-6

    def eager(x, w, s, h):
        return modulated_rms_norm_eager(x, w, s, h, eps)

    def f_rms(x, w, s, h):
        return modulated_rms_norm_f_rms_norm(x, w, s, h, eps)

    def ours(x, w, s, h):
        return modnorm.modulated_rms_norm(x, w, s, h, eps)

    fns = {"eager": eager, "F.rms_norm+eager": f_rms}
    if device == "cuda" or os.environ.get("MODNORM_BENCH_COMPILE_CPU"):
        fns["torch.compile"] = "compile"
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers.functional import liger_modulated_rms_norm, liger_rms_norm

        if device == "cuda":

            def liger_rms(x, w, s, h):
                n = liger_rms_norm(x, w, eps) if w is not None else _liger_rms_noweight(x, eps)
                if s is None:
                    return n
                out = n * (1 + broadcast_modulation(s, x))
                return out + broadcast_modulation(h, x) if h is not None else out

            def _liger_rms_noweight(x, eps_):
                from liger_kernel.ops import LigerRMSNormFunction

                return LigerRMSNormFunction.apply(x, None, eps_, 0.0, "llama", True)

            def liger_fused(x, w, s, h):
                if s is None:
                    return liger_rms_norm(x, w, eps)
                return liger_modulated_rms_norm(x, w, s, h, eps)

            fns["Liger RMSNorm+eager"] = liger_rms
            fns["Liger fused"] = liger_fused
    except ImportError:
        pass
    fns["modnorm"] = ours
    return fns


def compiled_eager(eps=1e-6):
    """torch.compile of the eager code (provider "torch.compile"), compiled afresh: dynamo is reset
    first so that no case falls back to eager at the recompile limit (BENCH.md)."""
    torch._dynamo.reset()
    return torch.compile(lambda x, w, s, h: modulated_rms_norm_eager(x, w, s, h, eps), dynamic=False)


# ---- timing -------------------------------------------------------------------------------------


def time_gpu(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def time_cpu(fn, budget_s=2.0, min_reps=5, max_reps=200):
    fn()  # warm up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, timer):
    """Bytes read + written per second by a device copy of a 1 GiB tensor (CPU: 256 MiB)."""
    n = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / t


def host_time_us(fn, device, batches=8, reps=25, grad=False):
    """CPU time of one call: the median over batches of `reps` back-to-back calls (a mean over
    one long batch let a single stall of the process move the figure by 50%), under no_grad
    unless `grad`."""
    per_call = []
    with torch.set_grad_enabled(grad):
        fn()
        for _ in range(batches):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            per_call.append((time.perf_counter() - t0) / reps * 1e6)
        if device == "cuda":
            torch.cuda.synchronize()
    return statistics.median(per_call)


@dataclasses.dataclass
class Result:
    case: str
    provider: str
    fwd_s: float | None = None
    fwdbwd_s: float | None = None
    host_us: float | None = None
    peak_mb: float | None = None
    error: str | None = None


def run_case(case: Case, device, timer, progress, providers=None):
    x, w, s, h = make_inputs(case, device)
    grads_of = [t for t in (x, w, s, h) if t is not None]
    dy = torch.randn(x.shape, device=device, dtype=x.dtype)
    results = []
    for name, fn in provider_fns(case, device).items():
        if providers and name not in providers:
            continue
        progress(f"  {case.name:12s} {name}")
        r = Result(case.name, name)
        try:
            if fn == "compile":
                fn = compiled_eager()
            with torch.no_grad():
                r.fwd_s = timer(lambda: fn(x, w, s, h))
            r.fwdbwd_s = timer(lambda: torch.autograd.grad(fn(x, w, s, h), grads_of, dy))
            r.host_us = host_time_us(lambda: fn(x, w, s, h), device)
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                torch.autograd.grad(fn(x, w, s, h), grads_of, dy)
                torch.cuda.synchronize()
                r.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as e:  # a provider that fails on a case is reported, not hidden
            r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        results.append(r)
    fwd_bytes, bwd_bytes = min_bytes(case, x, w, s, h)
    del x, w, s, h, dy, grads_of
    if device == "cuda":
        torch.cuda.empty_cache()
    return results, fwd_bytes, bwd_bytes


def stamp(device, bandwidth):
    parts = [
        f"date {datetime.date.today()}",
        f"torch {torch.__version__}",
        f"modnorm {modnorm.__version__}",
        f"python {platform.python_version()}",
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts.insert(0, f"GPU {props.name} ({props.multi_processor_count} SMs)")
        try:
            import subprocess

            drv = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
            parts.append(f"driver {drv}")
        except OSError:
            pass
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            pass
        try:
            from importlib.metadata import version

            parts.append(f"liger-kernel {version('liger-kernel')}")
        except Exception:
            parts.append("liger-kernel not installed")
    else:
        parts.insert(0, f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    parts.append(f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
    return ", ".join(parts)


def fmt_t(s):
    return "-" if s is None else (f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms")


def render(all_results, floors, device, bandwidth, command):
    lines = [
        f"# modnorm benchmark ({device})",
        "",
        f"{stamp(device, bandwidth)}",
        "",
        f"Command: `{command}`",
        "",
        "% of floor = (minimum bytes / measured copy bandwidth) / time: 100% is the physical limit.",
        "bf16 x, eps 1e-6, llama casting. fwd+bwd is torch.autograd.grad against every input.",
        "",
        "| case | provider | fwd | fwd % floor | fwd+bwd | fwd+bwd % floor | modnorm speed-up fwd / fwd+bwd | host us | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case_name, results in all_results.items():
        ffl, bfl = floors[case_name]
        ours = next((r for r in results if r.provider == "modnorm"), None)
        for r in results:
            if r.error:
                lines.append(f"| {case_name} | {r.provider} | fails: {r.error} | | | | | | |")
                continue
            pf = f"{100 * ffl / r.fwd_s:.0f}%" if r.fwd_s else "-"
            pb = f"{100 * (ffl + bfl) / r.fwdbwd_s:.0f}%" if r.fwdbwd_s else "-"
            sp = "-"
            if ours and ours.fwd_s and r is not ours and r.fwd_s and r.fwdbwd_s and ours.fwdbwd_s:
                sp = f"{r.fwd_s / ours.fwd_s:.2f}x / {r.fwdbwd_s / ours.fwdbwd_s:.2f}x"
            host = f"{r.host_us:.1f}" if r.host_us is not None else "-"
            peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
            name = f"**{r.provider}**" if r is ours else r.provider
            lines.append(f"| {case_name} | {name} | {fmt_t(r.fwd_s)} | {pf} | {fmt_t(r.fwdbwd_s)} | {pb} | {sp} | {host} | {peak} |")
    return "\n".join(lines) + "\n"


def summary(all_results, floors):
    rows = [f"{'case':12s} {'fwd %floor':>10s} {'f+b %floor':>10s} {'vs best peer fwd':>17s} {'f+b':>6s}"]
    for case_name, results in all_results.items():
        ffl, bfl = floors[case_name]
        ours = next((r for r in results if r.provider == "modnorm"), None)
        if ours is None or ours.error:
            rows.append(f"{case_name:12s} modnorm failed: {ours.error if ours else '?'}")
            continue
        peers = [r for r in results if r is not ours and not r.error and r.fwd_s]
        best_f = min((r.fwd_s for r in peers), default=None)
        best_b = min((r.fwdbwd_s for r in peers), default=None)
        rows.append(
            f"{case_name:12s} {100 * ffl / ours.fwd_s:9.0f}% {100 * (ffl + bfl) / ours.fwdbwd_s:9.0f}% "
            f"{best_f / ours.fwd_s if best_f else float('nan'):16.2f}x {best_b / ours.fwdbwd_s if best_b else float('nan'):5.2f}x"
        )
    return "\n".join(rows)


def plot(all_results, floors, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(all_results)
    providers = []
    for results in all_results.values():
        for r in results:
            if r.provider not in providers:
                providers.append(r.provider)
    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    width = 0.8 / len(providers)
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward+backward")):
        for i, p in enumerate(providers):
            vals = []
            for c in cases:
                r = next((r for r in all_results[c] if r.provider == p), None)
                ffl, bfl = floors[c]
                t = None if (r is None or r.error) else (r.fwd_s if key == "fwd" else r.fwdbwd_s)
                fl = ffl if key == "fwd" else ffl + bfl
                vals.append(100 * fl / t if t else 0)
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right")
        ax.set_ylabel("% of floor (higher is better)")
        ax.set_title(title)
        ax.axhline(100, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="*", help="subset of case names")
    ap.add_argument("--out", default="docs", help="folder for the table (and plot)")
    ap.add_argument("--providers", nargs="*", help="subset of providers (e.g. modnorm torch.compile)")
    args = ap.parse_args(argv)
    device = args.device
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    if args.cases:
        cases = [c for c in cases if c.name in args.cases]
    timer = time_gpu if device == "cuda" else time_cpu

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    bandwidth = copy_bandwidth(device, timer)
    progress(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    command = "python -m modnorm.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    name = "benchmarks.md" if device == "cuda" else "benchmarks-cpu.md"
    all_results, floors = {}, {}
    for i, case in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {case.name} {case.shape}")
        results, fb, bb = run_case(case, device, timer, progress, args.providers)
        all_results[case.name] = results
        floors[case.name] = (fb / bandwidth, bb / bandwidth)
        table = render(all_results, floors, device, bandwidth, command.strip())
        with open(os.path.join(args.out, name), "w") as f:  # after every case: a long run keeps what it has
            f.write(table)
    if device == "cuda" and plot(all_results, floors, os.path.join(args.out, "benchmarks.png")):
        progress(f"wrote {os.path.join(args.out, 'benchmarks.png')}")
    print(table)
    print(summary(all_results, floors))
    progress(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
