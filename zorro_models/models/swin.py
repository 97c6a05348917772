"""Zorro-Swin: windowed attention per modality, shifted windows, per-modality patch merging, global fusion tokens.

Design (ours; the paper's Swin adaptation is not at hand — docs/swin.md has the pictures):

- Each modality keeps its own token grid: audio ``(T, F)`` (time x frequency patches), video ``(T, H, W)``.
- **One zorro_attention call per block.** Tokens are permuted into *window order* so that every window is a contiguous
  segment ``audio/0, audio/1, ..., video/0, ..., fusion``; the mask's rules are ``{"audio/*": "self",
  "video/*": "self", "fusion": "*"}``: a window row sees its own window only, fusion rows see every token. Windows
  never see the fusion tokens — that would route video into audio through fusion and break purity.
  ``mask="bottleneck"`` lets windows see the fusion tokens too (MBT-style), ``mask="full"`` lets every token see every
  token of the block (the windows then only order the tokens): the ablations, neither pure.
- **Shifted windows** are the partition of the grid with boundaries at ``s, s + w, s + 2w, ...`` (clipped at the
  borders), which groups exactly the tokens that Swin's cyclic shift + attention mask lets attend each other; here
  they are simply windows of different sizes, with no roll and no mask arithmetic. Windows are ordered by size, so
  equal-size windows are consecutive and the CPU backend runs each run of them as one batched call.
- **Patch merging per modality** (2 x 2 over audio ``(T, F)``, 1 x 2 x 2 over video ``(T, H, W)``: video keeps its
  time resolution, as in Video Swin), each with its own weights; fusion tokens are widened by a per-token linear map.
  Merging mixes tokens only inside one modality, so purity survives it. Padding tokens are zeroed before merging so
  that padding never enters a valid merged token.
- Windows and shifts follow Swin: a window dimension larger than the grid is clipped to it, and that dimension is then
  not shifted.
- **Relative position bias** (Swin's, on by default): every block has a learned table per head, over the
  ``(2Wt-1)(2Wf-1)`` offsets of an audio window followed by the ``(2Wt-1)(2Wh-1)(2Ww-1)`` offsets of a video window
  (Video Swin's 3-D bias); ``zorro_attention`` indexes it per window on the fly (:class:`~zorro_kernels.bias.
  RelativePositionBias`), never as ``N x N``. Shifted windows index the same table; fusion tokens have no position and
  get no bias. A bias only between tokens of one window cannot carry one stream into another: purity holds.
  Learned absolute position embeddings per modality are still added at the input.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from zorro_kernels import RelativePositionBias, RelativePositions, ZorroMask
from zorro_kernels.caching import tensor_key

from .base import Encoded, StreamLayout, ZorroModel, check_mask_kind, mask_rules
from .layers import MODALITIES, MaskedReadout, ZorroBlock, init_weights
from .registry import register_model
from .tokenizers import AudioPatchEmbed, VideoPatchEmbed, to_pair, to_triple

__all__ = ["ZorroSwin", "window_partition", "window_order", "WindowLayout", "swin_block_layout"]

_CPU = torch.device("cpu")  # the default device of the layouts a model builds before it knows its inputs

Window = tuple[tuple[int, int], ...]


def effective_window(
    grid: Sequence[int], window: Sequence[int], shifted: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Swin's rule: a window dimension is clipped to the grid, and only dimensions larger than the window shift
    (by half a window)."""
    win = tuple(min(w, n) for w, n in zip(window, grid))
    shift = tuple(w // 2 if shifted and n > w else 0 for w, n in zip(win, grid))
    return win, shift


def window_partition(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> list[Window]:
    """Windows of a grid as per-dimension ``(start, stop)`` ranges, ordered by size, then shape (stable).

    With ``shift`` 0 the cuts are at ``0, w, 2w, ...``; with shift ``s`` at ``s, s + w, ...`` (the first and last
    windows of each dimension are then clipped). Every grid cell is in exactly one window.
    """
    per_dim = []
    for n, w, s in zip(grid, window, shift):
        cuts = sorted({0, n, *range(s, n, w)})
        per_dim.append(list(zip(cuts[:-1], cuts[1:])))
    windows = list(itertools.product(*per_dim))
    # equal sizes consecutive: the CPU backend batches a run of equal-size diagonal segments into one call
    windows.sort(key=lambda win: (math.prod(e - s for s, e in win), tuple(e - s for s, e in win)))
    return windows


def window_order(grid: Sequence[int], windows: Sequence[Window]) -> tuple[torch.Tensor, list[int]]:
    """Permutation of the grid's raster (time-major) token indices into window order, and each window's size.

    Inside a window tokens stay time-major, so the valid tokens of a clip cut short in time are a prefix of each
    window (what mask lengths describe). Returns ``(perm (N,) int64, sizes)``.
    """
    idx = torch.arange(math.prod(grid)).reshape(tuple(grid))
    parts = [idx[tuple(slice(s, e) for s, e in win)].reshape(-1) for win in windows]
    return torch.cat(parts), [p.numel() for p in parts]


def _window_lengths(windows: Sequence[Window], valid_t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(B, n_windows)`` valid tokens per window when only the first ``valid_t[b]`` time rows are valid."""
    if valid_t is None:
        return None
    t0 = torch.tensor([w[0][0] for w in windows])
    ext = torch.tensor([w[0][1] - w[0][0] for w in windows])
    rest = torch.tensor([math.prod(e - s for s, e in w[1:]) for w in windows])
    return torch.minimum((valid_t[:, None] - t0).clamp(min=0), ext) * rest


class WindowLayout(NamedTuple):
    """The token order and mask of one Swin block.

    perm: int64 ``(N,)`` — ``x[:, perm]`` puts canonical tokens (audio raster, video raster, fusion) in window order.
    inverse: int64 ``(N,)`` — ``y[:, inverse]`` puts them back.
    mask: the block's :class:`ZorroMask` over window-ordered tokens.
    windows: ``{"audio": [...], "video": [...]}`` the windows in order (per-dimension ranges).
    positions: the window-ordered tokens' grid coordinates for the relative position bias (audio ``(t, f)`` then
        video ``(t, h, w)``, one table part each; fusion unplaced), see :func:`window_positions`.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    mask: ZorroMask
    windows: dict
    positions: Optional[RelativePositions] = None


def rel_table_size(windows: dict) -> int:
    """Columns of a block's relative position table: ``(2Wt-1)(2Wf-1)`` audio offsets + ``(2Wt-1)(2Wh-1)(2Ww-1)``
    video offsets, for the configured windows ``{"audio": (t, f), "video": (t, h, w)}``."""
    return sum(math.prod(2 * w - 1 for w in windows[m]) for m in MODALITIES if m in windows)


def window_positions(grids: dict, windows: dict, perms: dict, num_fusion: int) -> RelativePositions:
    """Coordinates of a block's tokens in window order, for :class:`~zorro_kernels.RelativePositionBias`.

    Args:
        grids: modality -> grid or None; windows: modality -> configured window (the table's extent: a clipped or
            shifted window's offsets are smaller); perms: modality -> its tokens' raster indices in window order;
        num_fusion: fusion tokens at the end (no position).
    Returns positions whose table is the audio part followed by the video part, whatever modalities are present, so
    one table serves every input.
    """
    n = sum(p.numel() for p in perms.values()) + num_fusion
    parts, offset = [], 0
    for m in (m for m in MODALITIES if m in windows):
        ext = tuple(windows[m])
        coords = torch.full((n, len(ext)), -1, dtype=torch.int64)
        if grids.get(m) is not None:
            perm = perms[m]
            grid = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grids[m]), indexing="ij"), -1)
            coords[offset : offset + perm.numel()] = grid.reshape(-1, len(ext))[perm]
            offset += perm.numel()
        parts.append(RelativePositions(coords, coords, ext))
    return RelativePositions.concat(parts)


def swin_block_layout(
    grids: dict,
    windows: dict,
    shifted: bool,
    num_fusion: int,
    valid_t: Optional[dict] = None,
    batch: Optional[int] = None,
    mask_kind: str = "zorro",
) -> WindowLayout:
    """Build one block's layout.

    Args:
        grids: modality -> token grid (time first), or None when the modality is absent; order audio, video.
        windows: modality -> configured window size.
        shifted: the shifted-window block of the pair.
        num_fusion: fusion tokens (after the modalities).
        valid_t: modality -> int64 ``(B,)`` valid time rows per sample (or None entries / None: all valid).
        batch: B, needed when ``valid_t`` is given.
        mask_kind: one of :data:`~zorro_models.models.base.MASK_KINDS`, applied with windows as the modality segments:
            ``zorro`` window-local, ``bottleneck`` window-local plus the fusion tokens, ``full`` every token of the
            block (windows then only order the tokens).
    """
    valid_t = valid_t or {}
    perms, segments, local, order, window_sizes, lengths, raster = [], [], [], {}, [], [], {}
    offset = 0
    for name, grid in grids.items():
        if grid is None:
            continue
        win, shift = effective_window(grid, windows[name], shifted)
        wins = window_partition(grid, win, shift)
        perm, sizes = window_order(grid, wins)
        raster[name] = perm
        perms.append(perm + offset)
        offset += perm.numel()
        segments += [(f"{name}/{i}", n) for i, n in enumerate(sizes)]
        local.append(f"{name}/*")
        order[name] = wins
        window_sizes.append(sizes)
        lengths.append(_window_lengths(wins, valid_t.get(name)))
    perms.append(torch.arange(offset, offset + num_fusion))
    segments.append(("fusion", num_fusion))
    mask_lengths = None
    if any(ln is not None for ln in lengths):
        cols = [ln if ln is not None else torch.tensor(sz).expand(batch, -1) for ln, sz in zip(lengths, window_sizes)]
        mask_lengths = torch.cat(cols + [torch.full((batch, 1), num_fusion)], dim=1)
    perm = torch.cat(perms)
    mask = ZorroMask.from_segments(segments, mask_rules(mask_kind, local), lengths=mask_lengths)
    return WindowLayout(perm, torch.argsort(perm), mask, order, window_positions(grids, windows, raster, num_fusion))


class PatchMerging(nn.Module):
    """Merge ``factors`` neighbouring tokens of one modality's grid into one token of width ``2 * dim``:
    ``(B, prod(grid), dim) -> (B, prod(merged grid), 2 * dim)`` (zero-padding odd sizes, as Swin does)."""

    def __init__(self, dim: int, factors: Sequence[int]):
        super().__init__()
        self.factors = tuple(factors)
        n = math.prod(self.factors)
        self.norm = nn.LayerNorm(n * dim)
        self.reduction = nn.Linear(n * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        merged = tuple(-(-n // f) for n, f in zip(grid, self.factors))
        x = x.reshape(x.shape[0], *grid, x.shape[-1])
        pad = []
        for n, m, f in reversed(list(zip(grid, merged, self.factors))):
            pad += [0, m * f - n]
        x = F.pad(x, [0, 0] + pad)
        if len(grid) == 2:
            x = rearrange(x, "b (t p) (f q) c -> b (t f) (p q c)", p=self.factors[0], q=self.factors[1])
        else:
            x = rearrange(
                x,
                "b (t p) (h q) (w r) c -> b (t h w) (p q r c)",
                p=self.factors[0],
                q=self.factors[1],
                r=self.factors[2],
            )
        return self.reduction(self.norm(x)), merged


class FusionMerging(nn.Module):
    """Fusion tokens at a stage change: ``LayerNorm -> Linear(dim, 2 * dim)`` per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))


class ZorroSwin(ZorroModel):
    """Zorro-Swin (see the module docstring and docs/swin.md). Inputs and outputs as
    :class:`~zorro_models.models.base.ZorroModel`; ``embed_dim`` (the output width) is ``base_dim * 2 ** (stages - 1)``.

    Args:
        img_size, num_frames, n_mels, audio_frames: input sizes, as in :class:`~zorro_models.models.vit.ZorroViT`.
        video_patch: ``(t, h, w)`` tubelet (int ``p`` = ``(1, p, p)``); Video Swin uses ``(2, 4, 4)``.
        audio_patch: ``(f, t)`` or int spectrogram patch.
        base_dim: width of the first stage; each stage doubles it.
        depths: blocks per stage (pairs of regular + shifted-window blocks).
        num_heads: heads per stage.
        audio_window: window ``(t, f)`` over the audio grid.
        video_window: window ``(t, h, w)`` over the video grid.
        mlp_ratio, qkv_bias: block sizes.
        num_fusion: fusion tokens (kept at every stage, widened with the stage).
        mask: one of :data:`~zorro_models.models.base.MASK_KINDS`, applied in every block (see
        :func:`swin_block_layout`). rel_pos_bias: Swin's learned relative position bias in every block (``(heads,
        rel_table_size(windows))``
            per block; see the module docstring).
    """

    def __init__(
        self,
        *,
        img_size: Union[int, Sequence[int]] = 224,
        num_frames: int = 8,
        video_patch: Union[int, Sequence[int]] = (2, 4, 4),
        n_mels: int = 128,
        audio_frames: int = 640,
        audio_patch: Union[int, Sequence[int]] = 4,
        base_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        audio_window: Union[int, Sequence[int]] = 8,
        video_window: Union[int, Sequence[int]] = (2, 7, 7),
        mlp_ratio: float = 4.0,
        num_fusion: int = 8,
        qkv_bias: bool = True,
        mask: str = "zorro",
        rel_pos_bias: bool = True,
    ):
        super().__init__()
        if not isinstance(rel_pos_bias, bool):
            raise TypeError(f"rel_pos_bias must be a bool, got {type(rel_pos_bias).__name__}")
        self.mask_kind = check_mask_kind(mask)
        if mask == "full" and rel_pos_bias:
            # the table holds offsets up to the window size; full attention pairs tokens of different windows
            raise ValueError(
                "mask='full' attends across Swin's windows, but the relative position bias is defined "
                "only within a window; build it with rel_pos_bias=False (model.kwargs.rel_pos_bias="
                "false) to compare with full attention"
            )
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads need one entry per stage, got {depths} and {num_heads}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be positive ints, got {depths}")
        if isinstance(num_fusion, bool) or not isinstance(num_fusion, int) or num_fusion < 0:
            raise ValueError(f"num_fusion must be an int >= 0, got {num_fusion!r}")
        dims = [base_dim * 2**s for s in range(len(depths))]
        for s, (d, h) in enumerate(zip(dims, num_heads)):
            if d % h != 0:
                raise ValueError(f"stage {s}: width {d} must be divisible by num_heads {h}")
        self.config = dict(
            img_size=img_size,
            num_frames=num_frames,
            video_patch=video_patch,
            n_mels=n_mels,
            audio_frames=audio_frames,
            audio_patch=audio_patch,
            base_dim=base_dim,
            depths=depths,
            num_heads=num_heads,
            audio_window=audio_window,
            video_window=video_window,
            mlp_ratio=mlp_ratio,
            num_fusion=num_fusion,
            qkv_bias=qkv_bias,
            mask=mask,
            rel_pos_bias=rel_pos_bias,
        )
        self.windows = {
            "audio": to_pair(audio_window, "audio_window"),
            "video": to_triple(video_window, "video_window", int_means="cube"),
        }
        self.depths, self.dims = depths, dims
        self.embed_dim = dims[-1]
        self.num_fusion = num_fusion
        self.audio_embed = AudioPatchEmbed(n_mels, audio_frames, audio_patch, base_dim)
        self.video_embed = VideoPatchEmbed(img_size, num_frames, to_triple(video_patch, "video_patch"), base_dim)
        self.fusion_tokens = nn.Parameter(torch.zeros(num_fusion, base_dim))
        # merge factors are fixed from the largest grids: a dimension of size 1 is never merged
        grid_a = (self.audio_embed.max_grid_t, self.audio_embed.grid_f)
        grid_v = (self.video_embed.max_grid_t, *self.video_embed.grid_hw)
        self.stages = nn.ModuleList()
        for s, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            stage = nn.Module()
            if s > 0:
                fa = tuple(2 if n > 1 else 1 for n in grid_a)
                fv = (1,) + tuple(2 if n > 1 else 1 for n in grid_v[1:])
                stage.merge_audio = PatchMerging(dims[s - 1], fa)
                stage.merge_video = PatchMerging(dims[s - 1], fv)
                stage.merge_fusion = FusionMerging(dims[s - 1])
                grid_a = tuple(-(-n // f) for n, f in zip(grid_a, fa))
                grid_v = tuple(-(-n // f) for n, f in zip(grid_v, fv))
            stage.blocks = nn.ModuleList(ZorroBlock(dim, heads, mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth))
            if rel_pos_bias:  # one table per block (Swin's relative_position_bias_table), both modalities' offsets
                stage.rel_tables = nn.ParameterList(
                    nn.Parameter(torch.zeros(heads, rel_table_size(self.windows))) for _ in range(depth)
                )
            self.stages.append(stage)
        self.norm = nn.LayerNorm(dims[-1])
        self.readout = MaskedReadout(dims[-1], num_heads[-1], mlp_ratio)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.fusion_tokens, std=0.02)
        for stage in self.stages:
            for t in getattr(stage, "rel_tables", ()):
                nn.init.trunc_normal_(t, std=0.02)

    def block_layout(
        self, grids: dict, shifted: bool, valid_t: dict, batch: int, device: torch.device = _CPU
    ) -> WindowLayout:
        """The layout of a block for these grids, shift and valid time rows, its permutations on ``device``
        (cached on the model)."""
        key = (
            "swin",
            tuple(grids.items()),
            shifted,
            tuple((k, tensor_key(v)) for k, v in valid_t.items()),
            str(device),
        )

        def build():
            layout = swin_block_layout(grids, self.windows, shifted, self.num_fusion, valid_t, batch, self.mask_kind)
            return layout._replace(perm=layout.perm.to(device), inverse=layout.inverse.to(device))

        return self._masks.get(key, build)

    def encode(self, inputs: StreamLayout) -> Encoded:
        batch, xs, xf = inputs.batch, dict(inputs.tokens), inputs.fusion
        grids = {m: inputs.grids.get(m) for m in MODALITIES}
        valid_t = {m: inputs.valid_rows(m) for m in inputs.valid}  # the windows cut the grid's time rows
        for s, stage in enumerate(self.stages):
            if s > 0:
                for name, merge in (("audio", stage.merge_audio), ("video", stage.merge_video)):
                    if name not in xs:
                        continue
                    x = xs[name]
                    if name in valid_t:  # padding must not leak into a valid merged token
                        rows = math.prod(grids[name][1:])
                        keep = torch.arange(x.shape[1])[None] < (valid_t[name] * rows)[:, None]
                        x = torch.where(keep[:, :, None].to(x.device), x, 0.0)
                    xs[name], grids[name] = merge(x, grids[name])
                    if name in valid_t:
                        valid_t[name] = -(-valid_t[name] // merge.factors[0])
                xf = stage.merge_fusion(xf)
            x = torch.cat([xs[n] for n in ("audio", "video") if n in xs] + [xf], dim=1)
            for i, block in enumerate(stage.blocks):
                layout = self.block_layout(grids, i % 2 == 1, valid_t, batch, x.device)
                bias = (
                    RelativePositionBias(stage.rel_tables[i].to(x.dtype), positions=layout.positions)
                    if hasattr(stage, "rel_tables")
                    else None
                )
                x = block(x[:, layout.perm], layout.mask, bias=bias)[:, layout.inverse]
            offset = 0
            for n in ("audio", "video"):
                if n in xs:
                    xs[n] = x[:, offset : offset + xs[n].shape[1]]
                    offset += xs[n].shape[1]
            xf = x[:, offset:]
        empty = xf.new_zeros(batch, 0, self.embed_dim)
        xa, xv = xs.get("audio", empty), xs.get("video", empty)
        tokens = self.norm(torch.cat([xa, xv, xf], dim=1))
        sizes = (xa.shape[1], xv.shape[1], xf.shape[1])
        per_stream = [valid_t[n] * math.prod(grids[n][1:]) if n in valid_t else None for n in ("audio", "video")]
        lengths = self._stream_lengths(batch, sizes, per_stream + [None])
        return Encoded(tokens, sizes, lengths)


register_model(
    "zorro_swin_demo",
    ZorroSwin,
    "CPU demo size (the inputs of zorro_vit_demo): widths 32-64, depths 2-2, heads 2-4, 4 fusion tokens; 32x64 "
    "spectrogram (4x4 patches, 4x4 windows), 4x32x32 video (2x4x4 tubelets, 2x4x4 windows); no relative position "
    "bias, so that the demo's full-attention run builds the same model",
    img_size=32,
    num_frames=4,
    video_patch=(2, 4, 4),
    n_mels=32,
    audio_frames=64,
    audio_patch=4,
    base_dim=32,
    depths=(2, 2),
    num_heads=(2, 4),
    audio_window=4,
    video_window=(2, 4, 4),
    num_fusion=4,
    rel_pos_bias=False,
)
register_model(
    "zorro_swin_tiny",
    ZorroSwin,
    "Swin-T widths (96, depths 2-2-6-2, heads 3-6-12-24) on small inputs: 64x128 spectrogram "
    "(4x4 patches, 8x8 windows), 4x64x64 video (2x4x4 tubelets, 2x4x4 windows); trains at lr 1e-4",
    # Swin's recipe scaled to the batch (5e-4 per 512 clips); at 1e-3 its embeddings collapse to a constant within
    # 10 steps, at 1e-4 every probe beats the untrained model's after 200 steps of 64 clips (docs/models.md)
    lr=1e-4,
    img_size=64,
    num_frames=4,
    video_patch=(2, 4, 4),
    n_mels=64,
    audio_frames=128,
    audio_patch=4,
    base_dim=96,
    depths=(2, 2, 6, 2),
    num_heads=(3, 6, 12, 24),
    audio_window=8,
    video_window=(2, 4, 4),
    num_fusion=8,
)
register_model(
    "zorro_swin_base",
    ZorroSwin,
    "Swin-B widths (128, depths 2-2-18-2, heads 4-8-16-32); Figure-2 inputs with 4x4 spectrogram "
    "patches (8x8 windows) and 2x4x4 video tubelets (2x7x7 windows)",
    img_size=224,
    num_frames=8,
    video_patch=(2, 4, 4),
    n_mels=128,
    audio_frames=640,
    audio_patch=4,
    base_dim=128,
    depths=(2, 2, 18, 2),
    num_heads=(4, 8, 16, 32),
    audio_window=8,
    video_window=(2, 7, 7),
    num_fusion=8,
)
