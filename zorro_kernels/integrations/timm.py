"""timm: give a ViT a :class:`~zorro_kernels.ZorroMask` as its ``attn_mask``.

::

    from zorro_kernels.integrations import timm as ztimm
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64)
    ztimm.enable(vit)
    prefix, patches = ztimm.num_tokens(vit)             # 1 class token, 16 patches
    mask = ZorroMask.from_segments([("cls", prefix), ("top", 8), ("bottom", 8)],
                                   {"cls": "*", "top": ["cls", "top"], "bottom": ["cls", "bottom"]})
    y = vit(x, attn_mask=mask)                          # every block's attention runs on zorro_attention

:func:`enable` switches each ``timm.layers.Attention`` of the model to a subclass whose forward sends an ``attn_mask``
that is a ZorroMask to zorro_attention; a tensor mask, no mask, or ``is_causal`` alone go through timm's own code
unchanged. Weights, ``state_dict`` keys and ``fused_attn`` are untouched; :func:`disable` switches back.

The layout covers the token sequence as the blocks see it: the prefix tokens first (the class token, then any
register tokens: ``model.num_prefix_tokens`` of them), then the patches in raster order. Its lengths, if any, are
per image. Rows that see nothing return 0 where timm's dense path would produce NaN.

In training mode with attention dropout (``attn_drop > 0``) the layout runs through SDPA on its dense form with
dropout, recorded in :func:`zorro_kernels.integrations.fallback_counts` (``enable(model, strict=True)`` raises
instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import zorro_attention
from ..mask import ZorroMask
from ..reference import expand_kv_heads
from ._fallback import dense_for_fallback, record_fallback

try:
    from timm.layers import Attention
except ImportError as e:  # pragma: no cover - exercised only without timm
    raise ImportError("zorro_kernels.integrations.timm needs timm >= 1.0 (pip install 'timm>=1.0')") from e

__all__ = ["enable", "disable", "num_tokens", "ZorroTimmAttention"]

_INTEGRATION = "timm"
_NEEDED = ("qkv", "q_norm", "k_norm", "proj", "proj_drop", "attn_drop", "num_heads", "head_dim", "scale")


class ZorroTimmAttention(Attention):
    """timm's ``Attention`` whose ``attn_mask`` may also be a :class:`~zorro_kernels.ZorroMask`.

    ``forward(x (B, N, C), attn_mask=None, is_causal=False) -> (B, N, C_out)``. With a ZorroMask over N tokens the
    attention is ``zorro_attention(q, k, v, attn_mask, scale=self.scale)`` with q, k, v ``(B, num_heads, N,
    head_dim)``; ``is_causal=True`` then requires a causal ZorroMask. Anything else is timm's forward.
    """

    zorro_strict: bool = False

    def forward(self, x: torch.Tensor, attn_mask=None, **kwargs) -> torch.Tensor:
        if not isinstance(attn_mask, ZorroMask):
            return super().forward(x, attn_mask=attn_mask, **kwargs)
        if kwargs.get("is_causal", False) and not attn_mask.causal:
            raise ValueError("is_causal=True with a non-causal ZorroMask: build the mask with causal=True")
        b, n, _ = x.shape
        if attn_mask.num_q != n or attn_mask.num_kv != n:
            raise ValueError(
                f"attn_mask covers {attn_mask.num_q} x {attn_mask.num_kv} tokens but the block sees N={n} tokens "
                f"(num_prefix_tokens prefix tokens first, then the patches; see zorro_kernels.integrations.timm."
                f"num_tokens)"
            )
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        if p > 0:
            record_fallback(
                _INTEGRATION,
                f"attention dropout p={p} in training mode (zorro_attention has no dropout)",
                strict=self.zorro_strict,
            )
            safe, live = dense_for_fallback(attn_mask, x.device)
            h = q.shape[1]
            out = F.scaled_dot_product_attention(
                q, expand_kv_heads(k, h), expand_kv_heads(v, h), attn_mask=safe, dropout_p=p, scale=self.scale
            )
            out = out.masked_fill(~live[:, None, :, None], 0.0)
        else:
            out = zorro_attention(q, k, v, attn_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)
        out = getattr(self, "norm", torch.nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


def enable(model: torch.nn.Module, *, strict: bool = False) -> int:
    """Let every ``timm.layers.Attention`` in ``model`` take a ZorroMask as ``attn_mask``. In place; idempotent.

    Args:
        model: a timm model (or any module containing ``timm.layers.Attention`` layers).
        strict: raise :class:`~zorro_kernels.integrations.FallbackError` instead of running SDPA when a layer with
            attention dropout is called with a ZorroMask in training mode.

    Returns:
        The number of attention layers that now accept a ZorroMask.

    Raises:
        TypeError if ``model`` is not an ``nn.Module``; ValueError if it has no ``timm.layers.Attention`` (models with
        other attention classes, e.g. ``AttentionRope`` or fused parallel blocks, are not supported yet).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    layers = [m for m in model.modules() if type(m) in (Attention, ZorroTimmAttention)]
    if not layers:
        kinds = sorted(
            {
                type(m).__name__
                for m in model.modules()
                if "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
            }
        )
        raise ValueError(
            f"{type(model).__name__} has no timm.layers.Attention layer to enable (attention classes "
            f"found: {kinds or 'none'})"
        )
    for m in layers:
        missing = [a for a in _NEEDED if not hasattr(m, a)]
        if missing:
            raise ValueError(f"this timm version's Attention lacks {missing}; zorro's timm integration needs timm>=1.0")
        # swapping the class keeps parameters, buffers, hooks and state_dict keys exactly as they are
        m.__class__ = ZorroTimmAttention
        m.zorro_strict = strict
    return len(layers)


def disable(model: torch.nn.Module) -> int:
    """Undo :func:`enable`: the attention layers are plain ``timm.layers.Attention`` again. Returns how many."""
    layers = [m for m in model.modules() if type(m) is ZorroTimmAttention]
    for m in layers:
        m.__class__ = Attention
        m.__dict__.pop("zorro_strict", None)
    return len(layers)


def num_tokens(model: torch.nn.Module) -> tuple[int, int]:
    """``(prefix, patches)``: the tokens a ViT's blocks see, in order — ``prefix`` class/register tokens first, then
    ``patches`` patch tokens — for the model's configured image size. A layout for ``attn_mask`` covers
    ``prefix + patches`` tokens."""
    try:
        return int(model.num_prefix_tokens), int(model.patch_embed.num_patches)
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__} is not a timm ViT with num_prefix_tokens and patch_embed") from e
