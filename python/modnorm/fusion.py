"""Graph-level fusion: find decomposed RMSNorm (+ modulation) in an FX graph and call modnorm.

    gm = modnorm.fuse(gm)            # torch.fx.symbolic_trace(model) or torch.export(...).module()
    model = torch.compile(model, backend="modnorm")   # the same pass inside torch.compile

The pattern, as OpenVINO's RMSFusion reads it, with the modulation folded in as well:

    x [-> cast f32] -> pow(2) | x*x | square -> mean(-1, keepdim) | sum(-1, keepdim) / D
      -> + eps (a number) -> rsqrt | 1/sqrt | reciprocal(sqrt) | pow(-0.5) -> * x   (or x / sqrt)
      [-> cast back (llama)] [-> * gamma | * (offset + gamma), gamma per channel (D,)]
      [-> cast back (gemma)] [-> * (c + scale) | * scale] [-> + shift]

Every intermediate must feed only the next step; the reduction must be over the last axis alone;
eps must be a number; exponents are compared exactly. Anything else is left as it is.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ._ops import ops

aten = torch.ops.aten

_MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_ADD = {operator.add, torch.add, aten.add.Tensor, aten.add.Scalar}
_DIV = {operator.truediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar}
_POW = {operator.pow, torch.pow, aten.pow.Tensor_Scalar}
_RSQRT = {torch.rsqrt, aten.rsqrt.default}
_SQRT = {torch.sqrt, aten.sqrt.default}
_RECIP = {torch.reciprocal, aten.reciprocal.default}
_SQUARE = {torch.square, aten.square.default}
_MEAN = {torch.mean, aten.mean.dim}
_SUM = {torch.sum, aten.sum.dim_IntList}
_CAST = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
_METHODS = {
    "mul": _MUL, "add": _ADD, "div": _DIV, "pow": _POW, "rsqrt": _RSQRT, "sqrt": _SQRT,
    "reciprocal": _RECIP, "square": _SQUARE, "mean": _MEAN, "sum": _SUM,
}  # fmt: skip
# Checks export leaves on intermediates: they go with the site.
_ASSERTS = {aten._assert_tensor_metadata.default}


def _is(node, ops_):
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in ops_
    if node.op == "call_method":
        return _METHODS.get(node.target) is ops_
    return False


def _is_cast(node):
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in ("to", "float", "type_as")
    return node.op == "call_function" and node.target in _CAST


def _cast_dtype(node):
    """The dtype a cast node converts to: a torch.dtype, a node (``x.dtype``), or None."""
    if node.op == "call_method" and node.target == "float":
        return torch.float32
    if node.target in ("type_as", aten.type_as.default):
        return ("type_as", node.args[1])
    for a in list(node.args[1:]) + [node.kwargs.get("dtype")]:
        if isinstance(a, torch.dtype) or (isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr):
            return a
    return None


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _binary(node):
    a = node.args[0]
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None:
        return None
    return a, b


def _real_users(node):
    return [u for u in node.users if not (u.op == "call_function" and u.target in _ASSERTS)]


def _single_user(node):
    users = _real_users(node)
    return users[0] if len(users) == 1 else None


def _meta(node):
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if isinstance(v, torch.Tensor):
            return v
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm
    return None


def _shape(node, gm):
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            t = gm
            for part in node.target.split("."):
                t = getattr(t, part)
            return tuple(t.shape) if isinstance(t, torch.Tensor) else None
        except AttributeError:
            return None
    m = _meta(node)
    if m is None:
        return None
    try:
        return tuple(int(s) for s in m.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _dtype(node):
    m = _meta(node)
    return getattr(m, "dtype", None)


@dataclasses.dataclass
class Site:
    x: fx.Node
    eps: float
    casting_mode: str = "none"
    weight: fx.Node | None = None
    offset: float = 0.0
    scale: fx.Node | None = None
    scale_offset: float = 1.0
    shift: fx.Node | None = None
    weight_promotes: bool = False
    final: fx.Node | None = None
    nodes: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def kind(self):
        parts = ["rms_norm"]
        if self.weight is not None:
            parts.append("gamma" + (f"(offset {self.offset:g})" if self.offset else ""))
        if self.scale is not None:
            parts.append(f"scale(scale_offset {self.scale_offset:g})")
        if self.shift is not None:
            parts.append("shift")
        return " + ".join(parts) + f" [{self.casting_mode}]"


def _last_axis(dims, rank):
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return dims == -1 or (rank is not None and dims == rank - 1)


def _reduction(node):
    """(input, dims, keepdim) of a mean or sum node."""
    args = list(node.args) + [None] * 3
    dims = node.kwargs.get("dim", args[1])
    keepdim = node.kwargs.get("keepdim", args[2] if args[2] is not None else False)
    return args[0], dims, keepdim


def _match_variance(node, xin, gm, nodes, upcast):
    """mean(square(xin), -1, keepdim=True) or sum(...)/D; appends the matched nodes, and to
    `upcast` the float32 cast of xin the variance was taken of, if it was."""
    rank_shape = _shape(xin, gm)
    rank = len(rank_shape) if rank_shape else None
    D = rank_shape[-1] if rank_shape else None
    red, divisor = node, None
    if _is(node, _DIV):
        ab = _binary(node)
        if ab is None or not _number(ab[1]) or not _is(ab[0], _SUM):
            return False
        red, divisor = ab[0], ab[1]
        if D is None or divisor != D:
            return False
    elif not _is(node, _MEAN):
        return False
    if _single_user(red) is None:
        return False
    sq, dims, keepdim = _reduction(red)
    if not keepdim or not _last_axis(dims, rank):
        return False
    if _single_user(sq) is None:
        return False
    if _is(sq, _POW):
        base, exp = _binary(sq) or (None, None)
        if exp != 2:
            return False
    elif _is(sq, _MUL):
        ab = _binary(sq)
        if ab is None or ab[0] is not ab[1]:
            return False
        base = ab[0]
    elif _is(sq, _SQUARE):
        base = sq.args[0]
    else:
        return False
    if base is not xin:
        # diffusers' RMSNorm: variance of x.float(), then x * rsqrt(...) on x itself (the product
        # promotes to float32, the same value as x.float() * rsqrt)
        if not (_is_cast(base) and base.args[0] is xin and _cast_dtype(base) == torch.float32):
            return False
        upcast.append(base)
    nodes += [sq, red] + ([node] if divisor is not None else [])
    return True


def _match_inv_rms(r, xin, gm, nodes):
    """r = 1/sqrt(variance + eps) in any of its spellings; returns (eps, x) or None, where x is
    what the variance was taken of (xin or its float32 upcast)."""
    chain = []
    if _is(r, _MUL) and (_binary(r) or (None, None))[1] == 1 and _single_user(r.args[0]) is r:
        chain.append(r)  # export writes 1 / t as reciprocal(t) * 1
        r = r.args[0]
    chain.append(r)
    if _is(r, _RSQRT):
        a = r.args[0]
    elif _is(r, _POW) and (_binary(r) or (None, None))[1] == -0.5:
        a = r.args[0]
    elif _is(r, _POW) and (_binary(r) or (None, None))[1] == -1 and _is(r.args[0], _SQRT):
        chain.append(r.args[0])
        a = r.args[0].args[0]
    elif _is(r, _RECIP) and _is(r.args[0], _SQRT):
        chain.append(r.args[0])
        a = r.args[0].args[0]
    elif _is(r, _DIV) and (_binary(r) or (None, None))[0] == 1 and _is(r.args[1], _SQRT):
        chain.append(r.args[1])
        a = r.args[1].args[0]
    else:
        return None
    return _match_eps(a, xin, gm, nodes, chain)


def _match_eps(a, xin, gm, nodes, chain):
    """a = variance + eps (eps a number); `chain` is the 1/sqrt part above it."""
    if not _is(a, _ADD) or any(_single_user(n) is None for n in chain[1:]):
        return None
    ab = _binary(a)
    if ab is None:
        return None
    var, eps = (ab[0], ab[1]) if _number(ab[1]) else (ab[1], ab[0])
    if not _number(eps) or _single_user(a) is None:
        return None
    found, upcast = [], []
    if not _match_variance(var, xin, gm, found, upcast):
        return None
    nodes += found + [a] + list(reversed(chain))
    return float(eps), (upcast[0] if upcast else xin)


def _match_norm(node, gm):
    """A Site for the normalized value `node` (= x * inv_rms, or x / sqrt(...)), or None."""
    nodes = []
    if _is(node, _MUL):
        ab = _binary(node)
        if ab is None:
            return None
        for xin, r in (ab, ab[::-1]):
            if isinstance(xin, fx.Node) and isinstance(r, fx.Node) and _single_user(r) is node:
                found = _match_inv_rms(r, xin, gm, nodes)
                if found is not None:
                    return Site(x=found[1], eps=found[0], nodes=nodes + [node], final=node)
                nodes = []
        return None
    if _is(node, _DIV):
        ab = _binary(node)
        if ab is None or not isinstance(ab[0], fx.Node) or not _is(ab[1], _SQRT):
            return None
        xin, s = ab
        if _single_user(s) is not node:
            return None
        found = _match_eps(s.args[0], xin, gm, nodes, [s])
        if found is None:
            return None
        return Site(x=found[1], eps=found[0], nodes=nodes + [node], final=node)
    return None


def _casts_to_dtype_of(cast, x):
    """Whether `cast` converts to x's own dtype (what llama/gemma casting rounds to)."""
    if _dtype(cast) is not None and _dtype(x) is not None:
        return _dtype(cast) == _dtype(x)
    target = _cast_dtype(cast)
    if isinstance(target, fx.Node):  # x.dtype
        return target.args[0] is x and target.args[1] == "dtype"
    if isinstance(target, tuple):  # type_as(x)
        return target[1] is x
    return target is not None and target == _dtype(x)


def _per_channel(node, D, gm):
    """A (D,) tensor. Without shape information for x, any 1-D tensor of more than one element
    multiplying the norm is per channel (another size would not broadcast against x)."""
    shape = _shape(node, gm)
    if shape is None or len(shape) != 1:
        return False
    return shape[0] == D if D is not None else shape[0] > 1


def _other_operand(node, kind, cur):
    """The operand of a binary `kind` node that is not `cur` (the value being extended), or None."""
    if not _is(node, kind):
        return None
    ab = _binary(node)
    if ab is None:
        return None
    return ab[1] if ab[0] is cur else ab[0]


def _constant_plus(node, user):
    """(c, t) when `node` is c + t (either order, c a number) read only by `user`, else (0, node):
    the offset of a gamma, the scale_offset of a modulation."""
    if _is(node, _ADD) and _single_user(node) is user:
        a, b = _binary(node) or (None, None)
        if _number(a) and isinstance(b, fx.Node):
            return float(a), b
        if _number(b) and isinstance(a, fx.Node):
            return float(b), a
    return 0.0, node


def _extend(site, gm):
    """Walks forward from the normalized value: casts, gamma, scale, shift."""
    x_shape = _shape(site.x, gm)
    D = x_shape[-1] if x_shape else None
    cur = site.final
    x0 = site.x.args[0] if _is_cast(site.x) else None  # the tensor before an upcast

    def step(pred):
        nonlocal cur
        nxt = _single_user(cur)
        if nxt is not None and pred(nxt):
            site.nodes.append(nxt)
            cur = nxt
            return nxt
        return None

    def noop_cast(n):  # a cast to the dtype x already has (what export leaves of type_as(x))
        return _is_cast(n) and x0 is None and _casts_to_dtype_of(n, site.x)

    llama = step(lambda n: _is_cast(n) and x0 is not None and _casts_to_dtype_of(n, x0))
    if llama is None:
        step(noop_cast)
    # gamma: * w, w * , * (offset + w), with w per channel; gemma style may upcast w first
    gamma_nodes = []  # (offset + w) and w.float(): they go with the site

    def is_gamma(n):
        other = _other_operand(n, _MUL, cur)
        if other is None:
            return False
        offset, w = _constant_plus(other, n)
        extra = [other] if w is not other else []
        if _is_cast(w) and _single_user(w) is not None and _cast_dtype(w) == torch.float32:
            w, extra = w.args[0], [w] + extra
        if not _per_channel(w, D, gm):
            if isinstance(w, fx.Node) and w.op == "get_attr":
                site.notes.append("gamma left out: not per channel")
            return False
        site.weight, site.offset = w, offset
        gamma_nodes.extend(extra)
        return True

    step(is_gamma)
    site.nodes += gamma_nodes
    gemma = None
    if llama is None and site.weight is not None:
        gemma = step(lambda n: _is_cast(n) and x0 is not None and _casts_to_dtype_of(n, x0))
        if gemma is None:
            step(noop_cast)
    if llama is not None:
        site.casting_mode, site.x = "llama", x0
        site.weight_promotes = site.weight is not None
    elif gemma is not None:
        site.casting_mode, site.x = "gemma", x0
    else:
        site.casting_mode = "none"
        site.weight_promotes = site.weight is not None

    scale_other = None

    def is_scale(n):
        nonlocal scale_other
        other = _other_operand(n, _MUL, cur)
        if other is None:
            return False
        if not isinstance(other, fx.Node) or other.op == "get_attr":
            return False  # constants are gammas, handled above
        so, s = _constant_plus(other, n)
        scale_other = other
        site.scale, site.scale_offset = s, so
        return True

    if step(is_scale) is not None:
        if scale_other is not site.scale:
            site.nodes.append(scale_other)  # c + scale goes with the site

        def is_shift(n):
            other = _other_operand(n, _ADD, cur)
            if other is None:
                return False
            if not isinstance(other, fx.Node) or other is cur:
                return False
            site.shift = other
            return True

        step(is_shift)
    site.final = cur
    return site


def _fused_site(x, weight, scale, shift, eps, offset, scale_offset, casting_mode, weight_promotes):
    """What a fused site computes: modnorm's op, with the output dtype the unfused code had.

    Modulation is left-padded to x's rank so it broadcasts exactly as the eager code did (SPEC
    rule 2, never the per-sample rule 1); shapes the op does not take (a last dim of 1, say) get
    the fused norm and an eager modulation."""
    out = x.dtype
    if weight is not None and weight_promotes:
        out = torch.promote_types(out, weight.dtype)
    for m in (scale, shift):
        if m is not None:
            out = torch.promote_types(out, m.dtype)

    def aligned(m):
        if m is None or (m.dim() <= x.dim() and m.shape[-1] == x.shape[-1]):
            return None if m is None else m.view((1,) * (x.dim() - m.dim()) + tuple(m.shape))
        return False

    s, h = aligned(scale), aligned(shift)
    if s is False or h is False:
        n = ops.modulated_rms_norm(x, weight, None, None, eps, offset, 1.0, casting_mode, True).to(out)
        n = n * (scale_offset + scale) if scale is not None else n
        return n + shift if shift is not None else n
    y = ops.modulated_rms_norm(x, weight, s, h, eps, offset, scale_offset, casting_mode, True)
    return y if y.dtype == out else y.to(out)


torch.fx.wrap("_fused_site")


def _erase_dead(graph, candidates):
    """Erases the candidates left without users, and then whatever fed only them (the upcast of x,
    its `x.dtype`, ...), with the export checks on any of them; placeholders and attributes stay."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = {n for n in candidates if n in order}
    while candidates:
        n = max(candidates, key=order.__getitem__)  # users come after their inputs
        candidates.discard(n)
        for u in list(n.users):
            if u.op == "call_function" and u.target in _ASSERTS:
                graph.erase_node(u)
        if n.users or n.op not in ("call_function", "call_method"):
            continue
        inputs = [i for i in n.all_input_nodes if i.op in ("call_function", "call_method")]
        graph.erase_node(n)
        candidates.update(i for i in inputs if i in order)


def fuse(gm: fx.GraphModule, example_inputs=None, verbose: bool = True) -> fx.GraphModule:
    """Rewrites every decomposed RMSNorm (+ gamma, + modulation) site of ``gm`` into modnorm's
    fused op, in place, and returns ``gm``. Reports one line per site and a count (printed when
    ``verbose``, and kept in ``gm.modnorm_report``).

    Shapes come from the graph's metadata (torch.export, Dynamo); a graph from
    torch.fx.symbolic_trace has none, and ``example_inputs`` supplies them. Without shapes the
    spellings that need x's last dim (``sum(-1) / D``, ``rank - 1`` axes) are left alone."""
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(gm).propagate(*example_inputs)
    graph = gm.graph
    report = []
    taken = set()
    for node in list(graph.nodes):
        if node in taken or node.graph is not graph:
            continue
        site = _match_norm(node, gm)
        if site is None:
            continue
        site = _extend(site, gm)
        final = site.final
        with graph.inserting_before(final):
            new = graph.call_function(
                _fused_site,
                (site.x, site.weight, site.scale, site.shift, site.eps, site.offset, site.scale_offset,
                 site.casting_mode, site.weight_promotes),
            )  # fmt: skip
        new.meta.update({k: v for k, v in final.meta.items() if k in ("val", "example_value", "tensor_meta")})
        final.replace_all_uses_with(new)
        _erase_dead(graph, set(site.nodes))
        taken.update(site.nodes)
        line = f"modnorm.fuse: site {len(report) + 1}: {site.kind()} at {final.name}"
        if site.notes:
            line += " (" + "; ".join(site.notes) + ")"
        report.append(line)
    graph.lint()
    gm.recompile()
    gm.modnorm_report = report + [f"modnorm.fuse: {len(report)} site(s) fused"]
    if verbose:
        print("\n".join(gm.modnorm_report))
    return gm


# The reports of the graphs compile_backend rewrote, newest last (for logs and tests).
compile_reports: list[list[str]] = []


def compile_backend(gm: fx.GraphModule, example_inputs):
    """torch.compile backend (``backend="modnorm"``): modnorm.fuse on the graph Dynamo captured,
    then Inductor for everything else. AOTAutograd traces the fused op's autograd formula, so the
    compiled backward runs modnorm's backward kernel too."""
    from torch._inductor.compile_fx import compile_fx

    compile_reports.append(fuse(gm, verbose=False).modnorm_report)
    return compile_fx(gm, example_inputs)


try:
    from torch._dynamo import register_backend

    register_backend(compiler_fn=compile_backend, name="modnorm")
except Exception:  # an older torch without the hook: pass backend=modnorm.compile_backend
    pass
