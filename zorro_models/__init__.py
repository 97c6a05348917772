"""zorro_models: Zorro-ViT, Zorro-Swin and Zorro-HiP audio-visual backbones on zorro_kernels' masked attention.

import zorro_models
model = zorro_models.create_model("zorro_vit_tiny")
x = model.example_inputs(batch_size=2)              # {"audio": (B, n_mels, frames), "video": (B, T, 3, H, W)}
out = model(audio=x["audio"], video=x["video"])     # {"audio", "video", "fusion", "global"} -> (B, D)
out = model(audio=x["audio"])                       # audio only: out["video"] is all zeros
"""

from zorro_kernels import __version__

from .models import hip, swin, vit  # noqa: F401  (register the presets)
from .models.base import MASK_KINDS, Encoded, StreamLayout, ZorroFeatures, ZorroModel
from .models.heads import ContrastiveHeads, SupervisedHeads
from .models.hip import ZorroHiP
from .models.layers import OUTPUTS, STREAMS, MaskedReadout
from .models.registry import create_model, list_models, model_config, register_model
from .models.swin import ZorroSwin
from .models.vit import ZorroViT
from .training.losses import DEFAULT_PAIRS, SupervisedLoss, ZorroContrastiveLoss, info_nce

__all__ = [
    "__version__",
    "MASK_KINDS",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
    "ZorroModel",
    "ZorroFeatures",
    "StreamLayout",
    "Encoded",
    "ZorroViT",
    "ZorroSwin",
    "ZorroHiP",
    "SupervisedHeads",
    "ContrastiveHeads",
    "SupervisedLoss",
    "ZorroContrastiveLoss",
    "info_nce",
    "DEFAULT_PAIRS",
    "OUTPUTS",
    "STREAMS",
    "MaskedReadout",
]
