"""Model level: one training step (forward, loss, backward, optimizer step) of a Zorro-ViT, zorro attention vs the
same model with every attention call on SDPA with a dense boolean mask.

The masked-SDPA model is the same model object type with the same weights: the benchmark registers a backend that
runs SDPA on the materialized mask (built once per layout, like a careful dense implementation would) and makes it
the one ``backend="auto"`` picks, for this test only. Skips, saying why, until ``zorro_models`` has ``create_model``.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn.functional as F

import zorro_kernels.auto as zauto
from benchmarks.conftest import RESULTS
from benchmarks.measure import sync
from benchmarks.peers import MASKED
from zorro_kernels.backends import BACKENDS, Backend, backward_by_recompute
from zorro_kernels.integrations._fallback import dense_for_fallback
from zorro_kernels.reference import expand_kv_heads
from zorro_kernels.testing import assert_within_policy

# (preset, overrides, batch) per (tier, device type). zorro_vit_small has the Figure-2 token counts; 4 blocks keep the
# CPU step near a second.
MODELS = {
    ("full", "cpu"): ("zorro_vit_small", dict(depth=4), 2),
    ("smoke", "cpu"): ("zorro_vit_demo", {}, 2),
    ("full", "cuda"): ("zorro_vit_base", {}, 8),
    ("smoke", "cuda"): ("zorro_vit_demo", {}, 2),
}
BENCH_BACKEND = "bench-sdpa-masked"


def _masked_sdpa(q, k, v, mask, scale, bias=None):  # the backend declares no bias: always None
    safe, live = dense_for_fallback(mask, q.device)  # the dense mask, rows that see nothing opened (and zeroed)
    h = q.shape[1]
    out = F.scaled_dot_product_attention(q, expand_kv_heads(k, h), expand_kv_heads(v, h), attn_mask=safe, scale=scale)
    return out.masked_fill(~live[:, None, :, None], 0.0)


def _create(tier, device):
    try:
        import zorro_models
    except ImportError as e:
        pytest.skip(f"zorro_models does not import: {e}")
    if not hasattr(zorro_models, "create_model"):
        pytest.skip("zorro_models has no create_model yet (the model-level case needs a registered Zorro-ViT)")
    name, overrides, batch = MODELS[(tier, device.type)]
    try:
        torch.manual_seed(0)
        model = zorro_models.create_model(name, **overrides)
    except (ValueError, TypeError) as e:
        pytest.skip(f"cannot build {name}{overrides or ''}: {e}")
    inputs = {k: v for k, v in model.example_inputs(batch_size=batch).items()}
    return name, overrides, batch, model, inputs


def _forward(model, inputs):
    return model(**inputs)


def _loss(outputs) -> torch.Tensor:
    return sum(o.float().pow(2).mean() for o in outputs.values())


@pytest.fixture
def attention_impl(monkeypatch):
    """``use(name)``: make ``backend="auto"`` pick ``name`` ("auto" restores the default) for the rest of the test."""
    monkeypatch.setitem(
        BACKENDS,
        BENCH_BACKEND,
        Backend(
            BENCH_BACKEND,
            "benchmark only: SDPA with the dense bool mask",
            lambda q, k, v, mask, scale: (_masked_sdpa(q, k, v, mask, scale), q.new_zeros(q.shape[:3])),
            backward_by_recompute(_masked_sdpa),
            eager=_masked_sdpa,
        ),
    )
    default = dict(zauto.PRIORITY)

    def use(name):
        monkeypatch.setattr(zauto, "PRIORITY", default if name == "auto" else {t: (name,) for t in ("cpu", "cuda")})

    return use


@pytest.mark.parametrize("impl", ["zorro", MASKED])
def test_model_train_step(benchmark, impl, tier, device, dtype, attention_impl):
    name, overrides, batch, model, inputs = _create(tier, device)
    model = model.to(device=device, dtype=dtype)
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    # correctness first: this model's outputs against the fp64 model on the dense reference backend
    attention_impl("reference")
    with torch.no_grad():
        ref = _forward(
            copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        )
        same = _forward(model, inputs)
    attention_impl("auto" if impl == "zorro" else BENCH_BACKEND)
    with torch.no_grad():
        got = _forward(model, inputs)
    for key in ref:
        assert_within_policy(f"{name} {impl} output {key!r}", got[key], same[key], ref[key], dtype)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step():
        loss = _loss(_forward(model, inputs))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    step()
    benchmark.group = f"model {name}"
    rounds = {"smoke": 3}.get(tier, 5 if device.type == "cpu" else 20)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    shape = f"B={batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params" + (
        f", {overrides}" if overrides else ""
    )
    info = dict(
        kind="model",
        layout=name,
        shape=shape,
        peer=impl,
        direction="train step",
        family="model",
        median_s=statistics.median(benchmark.stats.stats.data),
        rounds=rounds,
    )
    benchmark.extra_info.update(info)
    RESULTS[(name, "train step", impl)] = info
