"""The tolerance policy, in one place.

A kernel is compared with an fp64 math reference. Its error may be at most twice the error PyTorch itself makes at the
same precision (the dense reference computed in the input dtype, against the same fp64 reference), plus a small floor
per dtype. Every failure message carries the numbers.
"""

from __future__ import annotations

import torch

from zorro_kernels import RelativePositionBias, reference_attention
from zorro_kernels.bias import materialize_bias

# absolute floor, scaled by the reference's magnitude; fp16/bf16 floors cover one rounding of the output itself
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_policy(
    name: str, got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype
) -> None:
    """``|got - ref64| <= 2 * |torch_same - ref64| + floor``, NaN/Inf checked first."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    kernel_err = max_err(got, ref64)
    torch_err = max_err(torch_same, ref64)
    bound = 2 * torch_err + FLOOR[dtype] * scale
    assert kernel_err <= bound, (
        f"{name} ({dtype}): kernel error {kernel_err:.3e} > bound {bound:.3e} "
        f"(2 x torch error {torch_err:.3e} + floor {FLOOR[dtype] * scale:.3e})"
    )


def _bias_leaf(bias, cast, grad: bool):
    """``(bias for the call, the leaf tensor whose gradient is checked or None)``, cast like q, k, v."""
    if bias is None:
        return None, None
    if isinstance(bias, RelativePositionBias):
        table = cast(bias.table).detach().requires_grad_(grad)
        return RelativePositionBias(table, positions=bias.positions), table
    leaf = cast(bias).detach().requires_grad_(grad)
    return leaf, leaf


def check_against_oracle(
    attn, q, k, v, mask, *, scale=None, grad: bool = True, seed: int = 0, bias=None
) -> torch.Tensor:
    """Run ``attn(q, k, v, mask, scale=[, bias=])`` and compare the output and dq, dk, dv (and the gradient of a dense
    ``bias``, or of a :class:`RelativePositionBias`'s table) with the oracle under the policy.

    q, k, v (and the bias) are tensors in the dtype under test. Returns the kernel's output.
    """
    dtype = q.dtype
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)

    def run(fn, cast):
        qq, kk, vv = (cast(t).detach().requires_grad_(grad) for t in (q, k, v))
        bb, leaf = _bias_leaf(bias, cast, grad)
        extra = {} if bb is None else {"bias": bb}
        out = fn(qq, kk, vv, **extra)
        inputs = (qq, kk, vv) + (() if leaf is None else (leaf,))
        if not grad:
            grads = ()
        elif out.requires_grad:
            grads = torch.autograd.grad(out, inputs, d_out.to(out.dtype), allow_unused=True, materialize_grads=True)
        else:  # a layout where every row sees nothing: the output is a constant 0
            grads = tuple(torch.zeros_like(t) for t in inputs)
        return out.detach(), [g.detach() for g in grads]

    got, got_g = run(lambda a, b, c, **kw: attn(a, b, c, mask, scale=scale, **kw), lambda t: t)
    ref, ref_g = run(lambda a, b, c, **kw: reference_attention(a, b, c, mask, scale=scale, **kw), lambda t: t.double())
    same, same_g = run(
        lambda a, b, c, **kw: reference_attention(a, b, c, mask, scale=scale, compute_dtype=dtype, **kw), lambda t: t
    )
    assert got.dtype == dtype, f"output dtype {got.dtype} != input dtype {dtype}"
    assert_within_policy("out", got, same, ref, dtype)
    names = ("dq", "dk", "dv", "dtable" if isinstance(bias, RelativePositionBias) else "dbias")
    for name, g, s, r in zip(names, got_g, same_g, ref_g):
        assert_within_policy(name, g, s, r, dtype)
    # rows that see nothing (the mask, or -inf biases on every key it allows): exactly zero, with zero gradient
    dense = mask.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense)[:, None]  # (B|1, 1, Nq, Nk)
    full = materialize_bias(bias)
    if full is not None:
        dense = dense & ~torch.isneginf(torch.where(dense, full.detach().cpu(), 0))
    dead = ~dense.any(-1)  # (B|1, H|1, Nq)
    if dead.any():
        dead4 = dead[..., None].expand_as(got)
        assert (got[dead4] == 0).all(), "a fully masked row is not exactly 0"
        if grad:
            assert (got_g[0][dead4] == 0).all(), "a fully masked row has a non-zero dq"
    return got
