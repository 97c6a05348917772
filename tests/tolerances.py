"""The tolerance policy, in one place.

A kernel is compared with an fp64 math reference. Its error may be at most twice the error PyTorch itself makes at the
same precision (the dense reference computed in the input dtype, against the same fp64 reference), plus a small floor
per dtype. Every failure message carries the numbers.
"""
from __future__ import annotations

import torch

from zorro_kernels import reference_attention

# absolute floor, scaled by the reference's magnitude; fp16/bf16 floors cover one rounding of the output itself
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_policy(name: str, got: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor,
                         dtype: torch.dtype) -> None:
    """``|got - ref64| <= 2 * |torch_same - ref64| + floor``, NaN/Inf checked first."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    kernel_err = max_err(got, ref64)
    torch_err = max_err(torch_same, ref64)
    bound = 2 * torch_err + FLOOR[dtype] * scale
    assert kernel_err <= bound, (f"{name} ({dtype}): kernel error {kernel_err:.3e} > bound {bound:.3e} "
                                 f"(2 x torch error {torch_err:.3e} + floor {FLOOR[dtype] * scale:.3e})")


def check_against_oracle(attn, q, k, v, mask, *, scale=None, grad: bool = True, seed: int = 0) -> torch.Tensor:
    """Run ``attn(q, k, v, mask, scale=)`` and compare output (and dq, dk, dv) with the oracle under the policy.

    q, k, v are leaf tensors in the dtype under test. Returns the kernel's output.
    """
    dtype = q.dtype
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.device)

    def run(fn, cast):
        qq, kk, vv = (cast(t).detach().requires_grad_(grad) for t in (q, k, v))
        out = fn(qq, kk, vv)
        grads = torch.autograd.grad(out, (qq, kk, vv), d_out.to(out.dtype)) if grad else ()
        return out.detach(), [g.detach() for g in grads]

    got, got_g = run(lambda a, b, c: attn(a, b, c, mask, scale=scale), lambda t: t)
    ref, ref_g = run(lambda a, b, c: reference_attention(a, b, c, mask, scale=scale), lambda t: t.double())
    same, same_g = run(lambda a, b, c: reference_attention(a, b, c, mask, scale=scale, compute_dtype=dtype),
                       lambda t: t)
    assert got.dtype == dtype, f"output dtype {got.dtype} != input dtype {dtype}"
    assert_within_policy("out", got, same, ref, dtype)
    for name, g, s, r in zip(("dq", "dk", "dv"), got_g, same_g, ref_g):
        assert_within_policy(name, g, s, r, dtype)
    # rows that see nothing: exactly zero, with zero gradient
    dense = mask.to_dense()
    dense = dense[None] if dense.ndim == 2 else dense
    dead = ~dense.any(-1)  # (B|1, Nq)
    if dead.any():
        dead4 = dead[:, None, :, None].expand_as(got)
        assert (got[dead4] == 0).all(), "a fully masked row is not exactly 0"
        if grad:
            assert (got_g[0][dead4] == 0).all(), "a fully masked row has a non-zero dq"
    return got
