"""GPU-only checks: more than 2^31 elements, misaligned and strided layouts, CPU/GPU agreement."""

import pytest
import torch

import modnorm
from modnorm.reference import modulated_rms_norm_eager

pytestmark = pytest.mark.gpu


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    D = 4096
    rows = (1 << 31) // D + 96  # 2^31 + 393216 elements
    x = torch.randn(1, rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = (0.1 * torch.randn(1, D, device="cuda")).requires_grad_()
    h = (0.1 * torch.randn(1, D, device="cuda")).requires_grad_()
    y = modnorm.modulated_rms_norm(x, None, s, h)
    tail = slice(rows - 200, rows)  # rows whose elements sit past index 2^31
    y_tail = modulated_rms_norm_eager(x.detach()[:, tail].float(), None, s.detach(), h.detach())
    torch.testing.assert_close(y[:, tail].float(), y_tail, atol=2e-2, rtol=2e-2)
    dy = torch.randn_like(x)
    gx, gs, gh = torch.autograd.grad(y, (x, s, h), dy)
    del y
    xt = x.detach()[:, tail].float().requires_grad_()
    yt = modulated_rms_norm_eager(xt, None, s.detach(), h.detach())
    (gxt,) = torch.autograd.grad(yt, xt, dy[:, tail].float())
    torch.testing.assert_close(gx[:, tail].float(), gxt, atol=2e-2, rtol=2e-2)
    # dshift = sum of dy over every row, accumulated here in float64 chunk by chunk
    ref = torch.zeros(D, device="cuda", dtype=torch.float64)
    for start in range(0, rows, 1 << 16):
        ref += dy[0, start : start + (1 << 16)].double().sum(0)
    torch.testing.assert_close(gh[0].double(), ref, atol=1e-2 * ref.abs().max().item(), rtol=1e-3)
    assert torch.isfinite(gs).all()


@pytest.mark.parametrize("D", [8, 127, 1152, 2050])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_misaligned_and_strided(D, dtype):
    # x a slice starting one element into a wider buffer (no 16-byte alignment, row stride D + 3),
    # modulation a chunk view whose offset is D elements (odd D: misaligned).
    wide = torch.randn(2, 9, D + 3, device="cuda", dtype=dtype)
    x = wide[..., 1 : D + 1].requires_grad_()
    proj = (0.3 * torch.randn(2, 1, 3 * D, device="cuda", dtype=dtype)).requires_grad_()
    shift, scale, _ = proj.chunk(3, dim=-1)
    w = torch.randn(D, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 9, D, device="cuda", dtype=dtype)
    y = modnorm.modulated_rms_norm(x, w, scale, shift, in_place=False)
    g = torch.autograd.grad(y, (x, w, proj), dy)
    xc, wc, pc = (t.detach().cpu().requires_grad_() for t in (x, w, proj))
    sc, hc = pc.chunk(3, dim=-1)[1], pc.chunk(3, dim=-1)[0]
    yc = modnorm.modulated_rms_norm(xc, wc, sc, hc, in_place=False)
    gc = torch.autograd.grad(yc, (xc, wc, pc), dy.cpu())
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y.cpu(), yc, **tol)
    for a, b in zip(g, gc):
        torch.testing.assert_close(a.cpu(), b, **tol)


# The forward of a call without a graph (fwd_y: no rstd allocated or written) gives bitwise the y
# of the forward that writes rstd, on every forward kernel: row tile, const, row block, register
# and loop rows, odd D, float32 modulation.
@pytest.mark.parametrize("D", [64, 128, 1152, 2048, 5120, 6000, 40000, 1001])
@pytest.mark.parametrize("kind", ["per_sample", "per_token", "none"])
@pytest.mark.parametrize("mod_dtype", [None, torch.float32], ids=["mod_x_dtype", "mod_fp32"])
def test_forward_without_rstd_matches(D, kind, mod_dtype):
    B, T = 2, 40 if D > 10000 else 300
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(D, device="cuda")).to(torch.bfloat16)
    shape = {"per_sample": (B, 1, D), "per_token": (B, T, D)}.get(kind)
    s = h = None
    if shape is not None:
        s, h = ((0.3 * torch.randn(*shape, device="cuda")).to(mod_dtype or torch.bfloat16) for _ in range(2))
    y, rstd = torch.ops.modnorm.fwd(x, w, s, h, 1e-6, 0.0, 1.0, "llama")
    y_only = torch.ops.modnorm.fwd_y(x, w, s, h, 1e-6, 0.0, 1.0, "llama")
    assert torch.equal(y_only, y)
    with torch.no_grad():
        assert torch.equal(modnorm.modulated_rms_norm(x, w, s, h), y)
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6))


@pytest.mark.parametrize("kind", ["per_sample", "per_token", "token_shared"])
def test_gpu_and_cpu_agree(kind):
    B, T, D = 2, 300, 3072
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    shape = {"per_sample": (B, D), "per_token": (B, T, D), "token_shared": (T, D)}[kind]
    s = 0.2 * torch.randn(shape, device="cuda")
    h = 0.2 * torch.randn(shape, device="cuda")
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    y = modnorm.modulated_rms_norm(x, w, s, h)
    yc = modnorm.modulated_rms_norm(x.cpu(), w.cpu(), s.cpu(), h.cpu())
    # llama casting rounds twice: xhat = x * rstd to bf16, then y. The two backends sum the
    # squares in different orders, so rstd may differ in its last float bit and an xhat that sits
    # at a rounding tie may round one bf16 ulp apart; y's own rounding then adds up to one more
    # ulp of y between them. Bound each element by exactly that (plus float32 arithmetic slop),
    # not by a tolerance on y alone, which a shift cancelling the product defeats.
    def bf16_ulp(v):
        return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-126))) - 7)

    x64, w64 = x.cpu().double(), w.cpu().double()
    m64, h64 = 1 + s.cpu().double(), h.cpu().double()
    if kind == "per_sample":
        m64, h64 = m64[:, None, :], h64[:, None, :]
    xhat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    product = xhat * w64 * m64
    ya, yb = y.cpu().double(), yc.double()
    bound = (w64 * m64).abs() * bf16_ulp(xhat) + bf16_ulp(torch.maximum(ya.abs(), yb.abs())) + 1e-5 * (product.abs() + h64.abs())
    excess = (ya - yb).abs() - bound
    assert (excess <= 0).all(), f"{(excess > 0).sum().item()} elements past the two-rounding bound, worst by {excess.max().item():.3g}"
    # and most elements agree exactly or within one ulp of y
    assert ((ya - yb).abs() <= bf16_ulp(torch.maximum(ya.abs(), yb.abs()))).float().mean() > 0.999


# forward_rows_kernel's shapes (1 to 24 vectors per lane, 1 to 32 lanes per row) and its row
# tiles: modulation cached per block (per sample, per frame, chunk views) with several tiles per
# run and a partial last one, per-token modulation (and (T, D) rows shared over the batch) loaded with x (same dtype) or after the sum
# (float32), and (D = 16, 800000 rows) blocks that walk several rows per team.
@pytest.mark.parametrize(
    "D,T",
    [(16, 400000), (32, 600), (128, 600), (512, 300), (1024, 300), (1152, 200), (2048, 100), (3072, 60), (4096, 60), (5120, 40), (6144, 40)],
)
@pytest.mark.parametrize(
    "kind,mod_dtype",
    [("per_sample", None), ("per_token", None), ("per_token", torch.float32), ("chunk", None), ("token_shared", None)],
    ids=["per_sample", "per_token", "per_token_fp32", "chunk", "token_shared"],
)
@pytest.mark.parametrize("weight_shift", [True, False], ids=["weight_shift", "scale_only"])
def test_forward_row_tiles(D, T, kind, mod_dtype, weight_shift):
    from test_accuracy import check_case

    check_case("cuda", torch.bfloat16, "llama", 0.0, kind, weight_shift, weight_shift, mod_dtype=mod_dtype, D=D, T=T)


# The row maps' divisions by run-time sizes (a multiply and a shift with host-made multipliers,
# src/fast_divmod.h) on sizes that are not powers of two: 74 tokens a sample, 37 frames of two
# tokens, (T, D) rows shared over the batch, groups of 74 rows. Each D takes another family of
# kernels that maps rows one at a time: the row tile and tile ring (256), the row block and
# the lean ring (2048), the const forward and pipe backward with float32 modulation (5120).
@pytest.mark.parametrize("D", [256, 2048, 5120])
@pytest.mark.parametrize("kind", ["per_sample", "token_shared", "per_frame", "groups"])
@pytest.mark.parametrize("mod_dtype", [None, torch.float32], ids=["mod_x_dtype", "mod_fp32"])
def test_row_maps_with_odd_divisors(D, kind, mod_dtype):
    from test_accuracy import check_case

    check_case("cuda", torch.bfloat16, "llama", 0.0, kind, True, True, mod_dtype=mod_dtype, D=D, T=74)


# backward_const_kernel (rows of a block share one scale row; llama and none casting) and the
# register kernel it stands in for (gemma), on rows long enough for block-wide teams.
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
@pytest.mark.parametrize("kind", ["per_sample", "shared", "chunk", "groups"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backward_long_rows_every_mode(mode, offset, kind, dtype):
    from test_accuracy import check_case

    check_case("cuda", dtype, mode, offset, kind, True, True, D=2048, T=200)


# backward_const_kernel's block-wide ring with one 16-byte vector a thread (sm_90+: rows of
# 129-256 vectors on 256 threads, where they do not fill whole warps; those that do take
# backward_lean_kernel, below): the edges of that range in every dtype, with a partial last block
# of threads (1544 bf16 = 193 vectors), and the finalize that follows it (launched
# programmatically on sm_90+).
@pytest.mark.parametrize(
    "dtype,D",
    [(torch.bfloat16, 1032), (torch.bfloat16, 1544), (torch.float16, 2040), (torch.float32, 516), (torch.float32, 1020)],
    ids=["bf16-129", "bf16-193", "fp16-255", "fp32-129", "fp32-255"],
)
@pytest.mark.parametrize("kind", ["per_sample", "chunk", "shared"])
@pytest.mark.parametrize("mode", ["llama", "none"])
def test_backward_one_vector_ring(dtype, D, kind, mode):
    from test_accuracy import check_case

    check_case("cuda", dtype, mode, 0.0, kind, True, True, D=D, T=150)


def backward_kernel_names(x, w, s, h, kernel, **options):
    """Names of the CUDA kernels called `kernel` in one backward of these leaves (after a warm-up
    call), template arguments spelled plainly ("1, 256, true", not "(int)1, (bool)1"). `options`
    go to modulated_rms_norm (offset, casting_mode)."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [t for t in (x, w, s, h) if t is not None]
    dy = torch.randn_like(x)
    y = modnorm.modulated_rms_norm(x, w, s, h, in_place=False, **options)
    torch.autograd.grad(y, leaves, dy, retain_graph=True)  # warm up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(y, leaves, dy)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if kernel in e.name]
    return [n.replace("(int)", "").replace("(bool)1", "true").replace("(bool)0", "false") for n in names]


# The finalize's two shapes (backward_kernels.cuh, finalize_kernel): 16 lanes with eight loads in
# flight where its grid has a block for every SM, 32 lanes with four where it has fewer. Each case
# has more partial rows per group than one round of its loads covers, so the loop and its
# remainder both run; results against float64 and the eager code. The grid is a block per 32
# columns for dweight and for each sample's dscale and dshift: 320 blocks at D = 2048, 15 at
# D = 96, so on GPUs of 16 to 320 SMs (H100, H200) the two cases take the two shapes. (D = 96 is
# 12 vectors, which the tile ring takes with many blocks an SM: D = 128 now takes the short-row
# kernel, whose two blocks an SM leave only ~one round of partial rows a group.)
@pytest.mark.parametrize("D,T", [(2048, 2500), (96, 4000)], ids=["narrow", "wide"])
def test_finalize_shapes(D, T):
    from test_accuracy import check_case

    check_case("cuda", torch.bfloat16, "llama", 0.0, "per_sample", True, True, D=D, T=T)
    bf = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(2, T, D, **bf)
    w, s, h = torch.randn(D, **bf), torch.randn(2, 1, D, **bf), torch.randn(2, 1, D, **bf)
    grid = (D // 32) * (1 + 2 * 2)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    shape = "<16, 8>" if grid >= sms else "<32, 4>"
    names = backward_kernel_names(x, w, s, h, "finalize_kernel")
    assert names and all(shape in n for n in names), names


def test_backward_one_vector_ring_is_the_one_that_runs():
    # Routing: 193-vector bf16 rows with per-sample modulation (not whole warps of vectors, so not
    # backward_lean_kernel) take the ring's one-vector shape (256 threads), not the two-vector one
    # (128 threads), on sm_90+.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk-copy rings need sm_90")
    x = torch.randn(2, 300, 1544, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(2, 1, 1544, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(2, 1, 1544, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    names = backward_kernel_names(x, None, s, h, "backward_const_kernel")
    # <XT, M, VEC, NV, TPR, TEAMS, RING, TOKEN>
    assert names and all(", 1, 256, 1, true, false>" in n for n in names), names


# backward_lean_kernel (sm_90+): block-wide rows of the common layout (dx, the block's one scale
# row, no per-row modulation gradient) whose 16-byte vectors fill whole warps, one vector on each
# thread (96 to 1024 threads). Each block-size class in every dtype, with and without weight and
# shift, llama and no casting, every modulation layout it takes, against float64 and the eager
# code; short sequences (a row or two a block) here, long ones below.
LEAN_SHAPES = [
    (torch.bfloat16, 768),  # 96 vectors: three warps
    (torch.bfloat16, 2048),  # 256 (ltx2b)
    (torch.bfloat16, 3072),  # 384 (flux, mochi)
    (torch.bfloat16, 5120),  # 640 (wan)
    (torch.bfloat16, 8192),  # 1024
    (torch.float16, 4096),  # 512 (ltx13b's length)
    (torch.float32, 2048),  # 512 float32 vectors
    (torch.float32, 3072),  # 768
]
LEAN_IDS = [f"{str(d).replace('torch.', '')}-{D}" for d, D in LEAN_SHAPES]

# backward_short_kernel (any architecture): the same layout in rows of exactly 8, 16 or 32 16-byte
# vectors (teams of that many lanes, four rows ahead in registers), each team width in every dtype;
# 600 rows a sample give every team several rounds of four rows and a short last round. (D = 512
# bf16, 64 vectors, stays with the tile ring: test_backward_tile_ring_against_float64.)
SHORT_SHAPES = [
    (torch.bfloat16, 64),  # 8 vectors
    (torch.bfloat16, 128),  # 16 (per-head QK norms)
    (torch.bfloat16, 256),  # 32
    (torch.float16, 128),
    (torch.float32, 64),  # 16 float32 vectors
    (torch.float32, 128),  # 32
]
SHORT_IDS = [f"{str(d).replace('torch.', '')}-{D}" for d, D in SHORT_SHAPES]
COMMON_LAYOUT_CASES = [(*shape, 75) for shape in LEAN_SHAPES] + [(*shape, 600) for shape in SHORT_SHAPES]
COMMON_LAYOUT_IDS = [f"lean-{i}" for i in LEAN_IDS] + [f"short-{i}" for i in SHORT_IDS]


@pytest.mark.parametrize("dtype,D,T", COMMON_LAYOUT_CASES, ids=COMMON_LAYOUT_IDS)
@pytest.mark.parametrize("kind", ["per_sample", "chunk", "shared", "groups"])
@pytest.mark.parametrize("weight,shift", [(True, True), (False, True), (True, False)], ids=["wsh", "sh", "ws"])
@pytest.mark.parametrize("mode", ["llama", "none"])
def test_backward_common_layout_kernels(dtype, D, T, kind, weight, shift, mode):
    from test_accuracy import check_case

    check_case("cuda", dtype, mode, 0.0, kind, weight, shift, D=D, T=T)


# Long sequences: each block walks many rows, so every stage of the ring is refilled and its
# barrier phases wrap several times.
@pytest.mark.parametrize("dtype,D", [LEAN_SHAPES[i] for i in (1, 2, 3, 5, 7)], ids=[LEAN_IDS[i] for i in (1, 2, 3, 5, 7)])
@pytest.mark.parametrize("kind", ["per_sample", "chunk", "shared"])
def test_backward_lean_kernel_long_sequences(dtype, D, kind):
    from test_accuracy import check_case

    check_case("cuda", dtype, "llama", 0.0, kind, True, True, D=D, T=2500)


@pytest.mark.parametrize(
    "kernel,dtype,D,shift,expected",
    [
        ("lean", torch.bfloat16, 2048, True, ", 8, true>"),
        ("lean", torch.bfloat16, 2048, False, ", 8, false>"),
        ("lean", torch.bfloat16, 4096, True, ", 8, true>"),
        ("lean", torch.bfloat16, 3072, True, ", 8, true>"),
        ("lean", torch.float16, 4096, True, ", 8, true>"),
        ("lean", torch.float32, 3072, True, ", 4, true>"),
        ("lean", torch.bfloat16, 1544, True, None),  # 193 vectors, not whole warps: the generic ring
        ("short", torch.bfloat16, 64, True, ", 8, 8, true>"),
        ("short", torch.bfloat16, 128, False, ", 8, 16, false>"),
        ("short", torch.bfloat16, 256, True, ", 8, 32, true>"),
        ("short", torch.float32, 128, True, ", 4, 32, true>"),
        ("short", torch.bfloat16, 512, True, None),  # 64 vectors: the tile ring
    ],
)
def test_backward_common_layout_kernel_is_the_one_that_runs(kernel, dtype, D, shift, expected):
    # Routing: backward_lean_kernel's <XT, M, VEC, SHIFT> or backward_short_kernel's
    # <XT, M, VEC, TPR, SHIFT> for the layouts above, and no generic row kernel beside it
    # (expected None: backward_const_kernel and not that kernel).
    if kernel == "lean" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk-copy rings need sm_90")
    x = torch.randn(2, 300, D, device="cuda", dtype=dtype, requires_grad=True)
    s = torch.randn(2, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    h = torch.randn(2, 1, D, device="cuda", dtype=dtype, requires_grad=True) if shift else None
    names = backward_kernel_names(x, None, s, h, "backward_")
    ours = [n for n in names if f"backward_{kernel}_kernel" in n]
    generic = [n for n in names if "backward_const_kernel" in n or "backward_reg_kernel" in n]
    if expected is None:
        assert generic and not ours, names
    else:
        assert ours and all(expected in n for n in ours), names
        assert not generic, names


# The backward's row kernels launch programmatically on sm_90+ (their blocks may start while the
# operation before them drains) and wait in the kernel before they touch memory. Each round's x
# and dy are written right before the backward (copies into the buffers it reads; then the test
# run's output poisoning, a fill kernel, is the kernel just before), and its gradients must be
# bitwise those of the same inputs in their own tensors; the kernel that runs is checked by name.
# Each row kernel: lean, short, the const kernel's one-vector ring and its per-token ring, the pipe
# kernel (per-token rows of 32 vectors), the register kernel (gemma casting). The fill before it
# does not release the backward early; test_kernel_chains_wait_for_the_kernel_before has kernels
# that do.
@pytest.mark.parametrize(
    "D,T,kind,mode,kernel",
    [
        (2048, 1500, "per_sample", "llama", "lean"),
        (4096, 800, "per_sample", "llama", "lean"),
        (128, 30000, "per_sample", "llama", "short"),
        (1544, 1000, "per_sample", "llama", "const"),
        (2048, 1000, "per_token", "llama", "const"),
        (256, 3000, "per_token", "llama", "pipe"),
        (2048, 1000, "per_sample", "gemma", "reg"),
    ],
    ids=["lean-2048", "lean-4096", "short-128", "const-ring-1544", "const-token-2048", "pipe-256", "reg-gemma-2048"],
)
def test_backward_row_pass_waits_for_the_kernel_before(D, T, kind, mode, kernel):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic launches need sm_90")
    B = 2
    bf = dict(device="cuda", dtype=torch.bfloat16)
    offset = 1.0 if mode == "gemma" else 0.0
    w = 0.2 * torch.randn(D, **bf) + (0.0 if mode == "gemma" else 1.0)
    mod_shape = (B, 1, D) if kind == "per_sample" else (B, T, D)
    s, h = (0.3 * torch.randn(mod_shape, **bf) for _ in range(2))
    xs = [torch.randn(B, T, D, **bf) for _ in range(3)]
    dys = [torch.randn(B, T, D, **bf) for _ in range(3)]
    mask = [True, True, True, True]
    ops = torch.ops.modnorm
    rstds = [ops.fwd(x, w, s, h, 1e-6, offset, 1.0, mode)[1] for x in xs]
    expected = [ops.bwd(dy, x, r, w, s, h, offset, 1.0, mode, mask) for dy, x, r in zip(dys, xs, rstds)]
    leaves = [t.clone().requires_grad_() for t in (xs[0], w, s, h)]
    names = backward_kernel_names(*leaves, "backward_", offset=offset, casting_mode=mode)
    assert any(f"backward_{kernel}_kernel" in n for n in names), names
    x_buf, dy_buf = torch.empty_like(xs[0]), torch.empty_like(dys[0])
    for _ in range(4):
        for i in range(3):
            x_buf.copy_(xs[i])
            dy_buf.copy_(dys[i])  # written right before the backward reads it
            got = ops.bwd(dy_buf, x_buf, rstds[i], w, s, h, offset, 1.0, mode, mask)
            for a, b in zip(got, expected[i]):
                assert torch.equal(a, b)


# Every modnorm kernel launches programmatically on sm_90+ and waits for the kernel before it in the
# kernel, so in a chain of modnorm operations, each reading what the one before wrote, the next
# kernel's blocks may run while the one before drains. programmatic_chains.py runs such chains
# (forward -> forward -> backward -> forward -> backward writing dx over its dy -> forward) for
# each forward kernel, in a process without output poisoning (whose fills would sit between the
# kernels), and compares every result bitwise with the same operation run alone: once as shipped
# (the backward's row kernels release the finalize early), once with MODNORM_PDL=early, where the
# forward kernels also release the next launch as soon as their waits return, so a kernel that
# did not wait would read inputs not yet written. A modnorm kernel writes within microseconds of
# starting, so the chains alone caught a build without the wait in one case of six (performance
# log, session 22); the same process also runs each operation after a late producer (below).
@pytest.fixture(scope="module")
def programmatic_chains():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic launches need sm_90")
    script = Path(__file__).with_name("programmatic_chains.py")
    results = {}
    for pdl in ("1", "early"):
        env = {k: v for k, v in os.environ.items() if k != "MODNORM_POISON_OUTPUTS"}
        env["MODNORM_PDL"] = pdl
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        results[pdl] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("pdl", ["1", "early"])
@pytest.mark.parametrize(
    "case,kernel",
    [
        ("row_block", "forward_row_block_kernel"),
        ("row_tile", "forward_row_tile_kernel"),
        ("const", "forward_const_kernel"),
        ("rows", "forward_rows_kernel"),
        ("reg", "forward_reg_kernel"),
        ("loop", "forward_loop_kernel"),
    ],
)
def test_kernel_chains_wait_for_the_kernel_before(programmatic_chains, case, kernel, pdl):
    result = programmatic_chains[pdl][case]
    seed = f"MODNORM_TEST_SEED={programmatic_chains[pdl]['seed']}"
    assert any(kernel in n for n in result["kernels"]), (seed, result["kernels"])
    assert any("backward_" in n for n in result["kernels"]), (seed, result["kernels"])
    assert not result["mismatch"], (seed, result["mismatch"])


# The same cases, each operation (forward, forward without rstd, backward, in-place backward)
# right after a kernel that releases the next launch at once and writes one of the operation's
# inputs 1 ms later (programmatic_chains.late_copy), each input in turn: only the wait keeps the
# operation's first kernel from reading NaN.
@pytest.mark.parametrize("pdl", ["1", "early"])
@pytest.mark.parametrize("case", ["row_block", "row_tile", "const", "rows", "reg", "loop"])
def test_kernels_wait_for_a_kernel_that_releases_them_at_once(programmatic_chains, case, pdl):
    result = programmatic_chains[pdl][case]
    seed = f"MODNORM_TEST_SEED={programmatic_chains[pdl]['seed']}"
    # Two rounds of eight operation/input pairs, each with dx (or y) among its results.
    assert result["late_compared"] >= 2 * 8, (seed, result["late_compared"])
    assert not result["late_mismatch"], (seed, result["late_mismatch"])


@pytest.mark.parametrize("kind", ["per_sample", "shared", "none"])
def test_backward_long_rows_bitwise_repeatable(kind):
    B, T, D = 2, 1000, 3072
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shape = {"per_sample": (B, 1, D), "shared": (D,), "none": None}[kind]
    s = torch.randn(shape, device="cuda", requires_grad=True) if shape else None
    h = torch.randn(shape, device="cuda", requires_grad=True) if shape else None
    dy = torch.randn_like(x)
    leaves = [t for t in (x, w, s, h) if t is not None]
    runs = []
    for _ in range(3):
        y = modnorm.modulated_rms_norm(x, w, s, h, in_place=False)
        runs.append(torch.autograd.grad(y, leaves, dy))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


# backward_const_kernel's tile ring (sm_90+, rows of at most 64 16-byte vectors, warp teams): a
# stage holds a tile of TEAMS consecutive rows, their dy rows and their rstd. D = 64..512 bf16
# reaches every warp-team shape (8 to 64 vectors); T = 37 rows per sample makes tiles that start
# off a multiple of 4 rows (rstd by cp.async instead of a bulk copy) and end short of TEAMS rows.
@pytest.mark.parametrize("D", [64, 128, 256, 512])
@pytest.mark.parametrize("kind", ["per_sample", "chunk", "shared"])
@pytest.mark.parametrize("T", [37, 300])
def test_backward_tile_ring_against_float64(D, kind, T):
    from test_accuracy import check_case

    check_case("cuda", torch.bfloat16, "llama", 0.0, kind, True, True, D=D, T=T)


# Plain RMSNorm of short rows (per-head QK norm: weight, no modulation), the BENCH qk-norm layout:
# dx and dweight against float64, at least as close as the eager code's, over 50,000 rows (every
# team many rounds of four rows).
@pytest.mark.parametrize("dtype,D", SHORT_SHAPES, ids=SHORT_IDS)
def test_backward_short_kernel_plain_rms_norm(dtype, D):
    rows = 50_000
    x = torch.randn(rows, D, device="cuda").to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(D, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(rows, D, device="cuda").to(dtype)
    ours = torch.autograd.grad(modnorm.rms_norm(x, w, in_place=False), (x, w), dy)
    eager = torch.autograd.grad(modulated_rms_norm_eager(x, w, None), (x, w), dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = torch.autograd.grad(modulated_rms_norm_eager(x64, w64, None, casting_mode="none"), (x64, w64), dy.double())
    for name, a, e, r in zip(("dx", "dweight"), ours, eager, ref):
        assert torch.isfinite(a).all(), name
        err, err_eager = ((t.double() - r).norm().item() / r.norm().item() for t in (a, e))
        assert err <= 1.10 * err_eager + 1e-6, f"{name}: modnorm {err:.3g} vs eager {err_eager:.3g}"


# The same rows read through per-row bulk copies (x and dy rows strided by D + 64 elements) give
# bitwise the gradients of contiguous rows (one bulk copy per tile), with the same rstd, also when
# that rstd sits 4 bytes off 16-byte alignment, and three runs agree bitwise. (D = 64 and 128 now
# take backward_short_kernel, whose plain loads read the strided rows in place; D = 512 the tile
# ring.)
@pytest.mark.parametrize("D", [64, 128, 512])
def test_backward_tile_ring_strided_rows_and_repeatable(D):
    B, T = 3, 37
    ops = torch.ops.modnorm
    x_wide = torch.randn(B, T, D + 64, device="cuda").to(torch.bfloat16)
    dy_wide = torch.randn(B, T, D + 64, device="cuda").to(torch.bfloat16)
    w = (1 + 0.5 * torch.randn(D, device="cuda")).to(torch.bfloat16)
    s = (0.3 * torch.randn(B, 1, D, device="cuda")).to(torch.bfloat16)
    h = (0.3 * torch.randn(B, 1, D, device="cuda")).to(torch.bfloat16)
    x, dy = x_wide[..., :D], dy_wide[..., :D]
    assert x.stride(1) == D + 64 and dy.stride(1) == D + 64
    _, rstd = ops.fwd(x.contiguous(), w, s, h, 1e-6, 0.0, 1.0, "llama")
    mask = [True, True, True, True]
    strided = ops.bwd(dy, x, rstd, w, s, h, 0.0, 1.0, "llama", mask)
    # rstd as a view 4 bytes into its storage: no tile's rstd is 16-byte aligned (cp.async path).
    rstd_shifted = torch.empty(rstd.numel() + 1, device="cuda")[1:].view_as(rstd)
    rstd_shifted.copy_(rstd)
    shifted = ops.bwd(dy.contiguous(), x.contiguous(), rstd_shifted, w, s, h, 0.0, 1.0, "llama", mask)
    for a, b in zip(strided, shifted):
        assert torch.equal(a, b)
    for _ in range(3):
        contiguous = ops.bwd(dy.contiguous(), x.contiguous(), rstd, w, s, h, 0.0, 1.0, "llama", mask)
        for a, b in zip(strided, contiguous):
            assert torch.isfinite(a).all() and torch.equal(a, b)


# forward_row_block_kernel (rows of 129-1024 16-byte vectors, weight in x's dtype, modulation in
# x's dtype or float32 per token): each of its block sizes (145, 300, 512, 700 and 1024 vectors:
# 128 and 256 threads with two or three vectors each, 512 threads) for bf16, fp16 and
# fp32 x, llama and no casting (float32 has no llama rounding: dispatch treats it as none), and
# every operand set it has a kernel for, plus per-token modulation, offset 0.5 with scale_offset
# 0, and x rows strided by D + 64 elements (16-byte aligned, so still this kernel). Outputs start
# as NaN (conftest), and y must match float64 at least as well as the eager code does.
ROW_BLOCK_CASES = [
    (dtype, mode)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for mode in (("llama", "none") if dtype != torch.float32 else ("none",))
]


ROW_OPERAND_SETS = ["none", "w", "s", "sh", "ws", "wsh", "wsh_token", "wsh_offsets", "wsh_strided"]


# "f32": float32 scale and shift per token (Wan 2.2's), both or the scale alone.
@pytest.mark.parametrize("vecs", [145, 300, 512, 700, 1024])
@pytest.mark.parametrize("dtype,mode", ROW_BLOCK_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("operands", ROW_OPERAND_SETS + ["wsh_f32_token", "s_f32_token"])
def test_forward_row_block_operand_sets(vecs, dtype, mode, operands):
    check_row_kernel_operand_set(vecs, dtype, mode, operands, T=37)


# forward_row_tile_kernel (rows of at most 128 vectors, same operand rules): each team shape
# (4, 8, 16 and 32 lanes with one vector, 32 lanes with 2 and 4), rows that fill part of a team,
# and 602 rows, so the last block is partial for every shape. Its modulation is per token here:
# per-sample rows of this length go to forward_const_kernel.
@pytest.mark.parametrize("vecs", [3, 8, 16, 29, 64, 100])
@pytest.mark.parametrize("dtype,mode", ROW_BLOCK_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("operands", ROW_OPERAND_SETS)
def test_forward_row_tile_operand_sets(vecs, dtype, mode, operands):
    check_row_kernel_operand_set(vecs, dtype, mode, operands, T=301, per_token=True)


def check_row_kernel_operand_set(vecs, dtype, mode, operands, T, per_token=False):
    from test_accuracy import MARGIN, noise_floor
    from helpers import rel_err
    from modnorm.reference import modulated_rms_norm_float64

    dev = "cuda"
    B = 2
    D = vecs * 16 // torch.tensor([], dtype=dtype).element_size()
    pad = 64 if operands.endswith("strided") else 0
    x = (2.0 * torch.randn(B, T, D + pad, device=dev)).to(dtype)[..., :D]
    w = (1.0 + 0.5 * torch.randn(D, device=dev)).to(dtype) if "w" in operands else None
    mod_shape = (B, T, D) if per_token or operands.endswith("token") else (B, 1, D)
    mod_dtype = torch.float32 if "f32" in operands else dtype
    s = (0.3 * torch.randn(mod_shape, device=dev)).to(mod_dtype) if "s" in operands else None
    h = (0.3 * torch.randn(mod_shape, device=dev)).to(mod_dtype) if "h" in operands else None
    offset, scale_offset = (0.5, 0.0) if operands.endswith("offsets") else (0.0, 1.0)
    y = modnorm.modulated_rms_norm(x, w, s, h, 1e-6, offset, mode, in_place=False, scale_offset=scale_offset)
    assert torch.isfinite(y).all(), "unwritten (poisoned) output elements"
    y_eager = modulated_rms_norm_eager(x, w, s, h, 1e-6, offset, mode, scale_offset).to(dtype)
    y64 = modulated_rms_norm_float64(x, w, s, h, 1e-6, offset, scale_offset)
    assert rel_err(y, y64) <= MARGIN["y"] * rel_err(y_eager, y64) + noise_floor(y)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_eager, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize(
    "D,mod,kernel",
    [
        (4096, "per_sample", "forward_row_block_kernel"),
        (5120, "per_token_f32", "forward_row_block_kernel"),
        (5120, "per_sample_f32", "forward_const_kernel"),
        (128, "per_token", "forward_row_tile_kernel"),
        (128, None, "forward_row_tile_kernel"),
        (128, "per_sample", "forward_const_kernel"),
    ],
)
def test_forward_row_kernel_is_the_one_that_runs(D, mod, kernel):
    # The cases above check values, not which kernel made them: this one checks the routing.
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 37, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    mod_dtype = torch.float32 if mod is not None and mod.endswith("f32") else torch.bfloat16
    s = None if mod is None else torch.randn(2, 37 if mod.startswith("per_token") else 1, D, device="cuda", dtype=mod_dtype)
    modnorm.modulated_rms_norm(x, w, s, s)  # warm up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        modnorm.modulated_rms_norm(x, w, s, s)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any(kernel in n for n in names), names
