"""zorro_kernels: modality-masked attention that never computes masked tiles.

from zorro_kernels import zorro_attention, ZorroMask
mask = ZorroMask.zorro(audio=320, video=1568, fusion=8)
out = zorro_attention(q, k, v, mask)   # q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D)
print(explain(q, k, v, mask))          # which backend "auto" runs, and why
"""

from ._version import __version__
from .attention import zorro_attention
from .auto import explain
from .bias import RelativePositionBias, RelativePositions
from .mask import ZorroMask
from .reference import reference_attention
from .tilemap import TileMap

__all__ = [
    "__version__",
    "zorro_attention",
    "explain",
    "ZorroMask",
    "RelativePositionBias",
    "RelativePositions",
    "reference_attention",
    "TileMap",
]
