"""Building blocks shared by the Zorro backbones: MLP, masked self-/cross-attention, the pre-norm block, the readout.

Every attention here goes through :func:`zorro_kernels.zorro_attention` with a :class:`~zorro_kernels.ZorroMask`; no
layer ever builds a dense mask. Everything else (LayerNorm, MLP, projections) acts on one token at a time, which is
why purity needs nothing but the masks: a token's update reads other tokens only through attention.

Token tensors are ``(B, N, C)`` throughout; a *stream layout* is the tuple of stream sizes in token order (e.g.
``(n_audio, n_video, n_fusion)``), used by :class:`StreamWise` for modality-specific weights.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

from zorro_kernels import ZorroMask, zorro_attention

__all__ = [
    "Mlp",
    "StreamWise",
    "Attention",
    "ZorroBlock",
    "CrossBlock",
    "MaskedReadout",
    "init_weights",
    "OUTPUTS",
    "STREAMS",
    "MODALITIES",
]

MODALITIES = ("audio", "video")
STREAMS = (*MODALITIES, "fusion")
OUTPUTS = ("audio", "video", "fusion", "global")


def init_weights(module: nn.Module) -> None:
    """Glorot-uniform linear weights (a fused q/k/v projection as one matrix, as ``torch.nn.MultiheadAttention``
    does), zero biases, unit LayerNorms.

    The width sets the scale, not a constant: ViT's fixed std 0.02 suits width 768 but leaves a 32-64 wide model's
    attention scores near 0 (every attention a plain average) and its outputs hardly depending on the input, and
    contrastive training then collapses to the constant embedding (loss ln(batch)) — issue 23.
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Mlp(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Linear(hidden, out_dim)`` on each token: ``(..., dim) -> (..., out_dim)``."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StreamWise(nn.Module):
    """A per-token module with either one set of weights for all streams or one set per stream.

    ``shared=False`` is the paper's "modality-specific" variant: audio, video and fusion tokens each go through their
    own copy. Streams must be contiguous in the token order (they are, in every Zorro layout).

    Args:
        make: builds one copy of the module (called once if shared, else once per stream).
        streams: stream names in token order.
        shared: one copy for every stream.

    Forward: ``x (B, N, C_in)`` and ``sizes`` (tokens per stream, summing to N) -> ``(B, N, C_out)``.
    """

    def __init__(self, make: Callable[[], nn.Module], streams: Sequence[str] = STREAMS, shared: bool = True):
        super().__init__()
        self.streams = tuple(streams)
        self.shared = shared
        if shared:
            self.module = make()
        else:
            self.per_stream = nn.ModuleDict({s: make() for s in self.streams})

    def forward(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        if self.shared:
            return self.module(x)
        parts = x.split(list(sizes), dim=1)
        return torch.cat([self.per_stream[s](p) for s, p in zip(self.streams, parts)], dim=1)


class Attention(nn.Module):
    """Multi-head attention through ``zorro_attention``: self-attention (``context=None``) or cross-attention.

    Args:
        dim: token width C (queries); ``context_dim`` the key/value token width (default ``dim``).
        num_heads: heads; ``dim`` must be divisible by it.
        qkv_bias: biases on the q/k/v projections.
        streams, shared: modality-specific projections (see :class:`StreamWise`); self-attention only.

    Forward:
        x: ``(B, Nq, C)``; context: ``(B, Nk, C_ctx)`` or None (self-attention); mask: a :class:`ZorroMask` with
        ``num_q == Nq`` and ``num_kv == Nk``; sizes: stream sizes of ``x`` (only used when ``shared=False``);
        bias: ``bias=`` of :func:`~zorro_kernels.zorro_attention` (e.g. a relative position bias) or None.
        Returns ``(B, Nq, C)``. Rows the mask lets see nothing come out of the attention as 0 (then the output
        projection's bias).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: Optional[int] = None,
        qkv_bias: bool = True,
        streams: Sequence[str] = STREAMS,
        shared: bool = True,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            if not shared:
                raise ValueError("modality-specific weights (shared=False) are for self-attention only")
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
        else:
            self.qkv = StreamWise(lambda: nn.Linear(dim, 3 * dim, bias=qkv_bias), streams, shared)
            self.proj = StreamWise(lambda: nn.Linear(dim, dim), streams, shared)

    def forward(
        self,
        x: torch.Tensor,
        mask: ZorroMask,
        context: Optional[torch.Tensor] = None,
        sizes: Sequence[int] = (),
        bias=None,
    ) -> torch.Tensor:
        h = self.num_heads
        if self.is_cross:
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=h)
            k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=h)
            out = zorro_attention(q, k, v, mask, bias=bias)
            return self.proj(rearrange(out, "b h n d -> b n (h d)"))
        q, k, v = rearrange(self.qkv(x, sizes), "b n (three h d) -> three b h n d", three=3, h=h)
        out = zorro_attention(q, k, v, mask, bias=bias)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"), sizes)


class ZorroBlock(nn.Module):
    """Pre-norm transformer block with masked self-attention: ``x + attn(norm(x)); x + mlp(norm(x))``.

    Args:
        dim, num_heads, mlp_ratio, qkv_bias: the usual ViT block sizes.
        streams, shared: stream names and whether their weights are shared (norms, attention projections, MLP).

    Forward: ``x (B, N, C)``, ``mask`` (self-attention layout over the N tokens), ``sizes`` (stream sizes, summing to
    N; only needed when ``shared=False``), ``bias`` (the attention's score bias or None) -> ``(B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        streams: Sequence[str] = STREAMS,
        shared: bool = True,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = StreamWise(lambda: nn.LayerNorm(dim), streams, shared)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, streams=streams, shared=shared)
        self.norm2 = StreamWise(lambda: nn.LayerNorm(dim), streams, shared)
        self.mlp = StreamWise(lambda: Mlp(dim, hidden), streams, shared)

    def forward(self, x: torch.Tensor, mask: ZorroMask, sizes: Sequence[int] = (), bias=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, sizes), mask, sizes=sizes, bias=bias)
        return x + self.mlp(self.norm2(x, sizes), sizes)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block: latents/queries read a context through a mask, then an MLP.

    ``z = z + attn(norm_q(z), norm_kv(context)); z = z + mlp(norm(z))``.

    Forward: ``z (B, Nq, C)``, ``context (B, Nk, C_ctx)``, ``mask`` (cross-attention layout, ``num_q == Nq``,
    ``num_kv == Nk``) -> ``(B, Nq, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: Optional[int] = None,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
    ):
        super().__init__()
        context_dim = context_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.attn = Attention(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, z: torch.Tensor, context: torch.Tensor, mask: ZorroMask) -> torch.Tensor:
        z = z + self.attn(self.norm_q(z), mask, context=self.norm_kv(context))
        return z + self.mlp(self.norm2(z))


class MaskedReadout(nn.Module):
    """Four learned queries read the final tokens through a cross-attention Zorro mask (Figure 2's decoder).

    ======== ===========================
    output   attends to
    ======== ===========================
    audio    audio tokens only
    video    video tokens only
    fusion   fusion tokens only
    global   every token
    ======== ===========================

    The mask is built with :meth:`ZorroMask.from_segments` and ``kv_segments`` — a dense mask never appears, so the
    operator-precedence slip that let the unimodal queries of the public reimplementation see every token cannot
    happen silently here (and the purity tests would catch it).

    An output whose keys are all absent for a sample (e.g. "video" when the sample has no video) is **exactly zero**
    for that sample: its attention row sees nothing, and the block's result is multiplied by a presence indicator, so
    the embedding is well defined and carries no learned-query constant.

    Args:
        dim: token width C (and output width).
        num_heads: attention heads.
        mlp_ratio: width of the MLP after the cross-attention.

    Forward:
        tokens: ``(B, N, C)`` final tokens in stream order ``audio, video, fusion``;
        sizes: ``(n_audio, n_video, n_fusion)`` summing to N (a size may be 0);
        lengths: int ``(B, 3)`` valid tokens per stream per sample, or None (all valid);
        mask: ``mask_for(sizes, lengths)`` built earlier (models cache it), or None to build it here.
        Returns ``(embeddings (B, 4, C), present (B, 4) bool)``, outputs in :data:`OUTPUTS` order.
    """

    rules = {"audio": ["audio"], "video": ["video"], "fusion": ["fusion"], "global": "*"}

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(len(OUTPUTS), dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.block = CrossBlock(dim, num_heads, mlp_ratio=mlp_ratio)
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def mask_for(cls, sizes: Sequence[int], lengths: Optional[torch.Tensor] = None) -> ZorroMask:
        """The readout mask: 4 query segments of one token each, key segments ``audio, video, fusion``."""
        q_lengths = None
        if lengths is not None:
            q_lengths = torch.ones(lengths.shape[0], len(OUTPUTS), dtype=torch.int64)
        return ZorroMask.from_segments(
            [(o, 1) for o in OUTPUTS],
            cls.rules,
            kv_segments=list(zip(STREAMS, sizes)),
            lengths=q_lengths,
            kv_lengths=lengths,
        )

    @staticmethod
    def presence(sizes: Sequence[int], lengths: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """``(B, 4)`` bool: whether each output sees at least one valid token of its streams."""
        valid = torch.tensor(sizes, dtype=torch.int64).expand(batch, -1) if lengths is None else lengths.cpu()
        has = valid > 0  # (B, 3): audio, video, fusion
        return torch.cat([has, has.any(1, keepdim=True)], dim=1)

    def forward(
        self,
        tokens: torch.Tensor,
        sizes: Sequence[int],
        lengths: Optional[torch.Tensor] = None,
        mask: Optional[ZorroMask] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = tokens.shape[0]
        if mask is None:
            mask = self.mask_for(sizes, lengths)
        z = self.queries.to(tokens.dtype).expand(b, -1, -1)
        z = self.norm(self.block(z, tokens, mask))
        present = self.presence(sizes, lengths, b).to(tokens.device)
        return z * present[:, :, None].to(z.dtype), present
