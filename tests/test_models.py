"""Zorro backbones: the public surface, purity (bitwise), unimodal inference, ragged batches, gradients, compile.

Purity is the product: the audio output must not move by a single bit when only the video changes (and the reverse).
The public reimplementation's readout bug (unimodal queries seeing every token) fails these tests; so does the
"full" mask, which test_full_and_bottleneck_masks_are_not_pure checks to prove the purity tests can fail.
"""

import copy

import pytest
import torch

import zorro_models
from zorro_kernels.testing import assert_within_policy
from zorro_models import OUTPUTS, create_model, list_models

# backbone -> (preset, overrides) small enough for the default tier (batch 2, CPU).
BACKBONES = {
    "vit": ("zorro_vit_tiny", {"depth": 3}),
    # smaller inputs, still with several regular and shifted windows per modality in the first stages
    "swin": (
        "zorro_swin_tiny",
        {
            "depths": (2, 2, 2, 2),
            "base_dim": 48,
            "num_heads": (2, 4, 8, 16),
            "img_size": 32,
            "n_mels": 32,
            "audio_frames": 64,
        },
    ),
    "hip": ("zorro_hip_tiny", {"depths": (1, 1, 1)}),
}
TINY_PRESETS = [n for n in list_models() if n.endswith(("_tiny", "_demo"))]
LARGE_PRESETS = [n for n in list_models() if n not in TINY_PRESETS]

# Outputs of the same math computed with another batch composition or sequence length: GEMM blocking (and so the
# rounding) may differ, the values may not. Embeddings are LayerNorm'd (entries of order 1).
SAME_MATH = dict(rtol=1e-4, atol=1e-5)

_models: dict = {}


def get_model(backbone: str, **extra):
    """Models are built once per (backbone, overrides) and reused: construction dominates these tests' time."""
    key = (backbone, tuple(sorted(extra.items())))
    if key not in _models:
        name, overrides = BACKBONES[backbone]
        torch.manual_seed(0)
        _models[key] = create_model(name, **{**overrides, **extra}).eval()
    return _models[key]


def inputs(model, batch=2, seed=1):
    return model.example_inputs(batch_size=batch, generator=torch.Generator().manual_seed(seed))


def assert_bitwise(a, b, what):
    assert torch.equal(a, b), f"{what}: max |diff| = {(a - b).abs().max().item():.3g} (must be bitwise equal)"


def assert_moved(a, b, what):
    assert not torch.equal(a, b), f"{what} did not change although its input did"


# ---------------------------------------------------------------------------------------------------- surface
def test_registry_has_the_presets():
    names = list_models()
    for n in ("zorro_vit_demo", "zorro_vit_tiny", "zorro_vit_base"):
        assert n in names
    for backbone in BACKBONES:
        assert BACKBONES[backbone][0] in names


def test_create_model_rejects_bad_names_and_keywords():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("zorro_vit_huge_nonexistent")
    with pytest.raises(TypeError, match="unknown override"):
        create_model("zorro_vit_demo", widht=3)
    with pytest.raises(ValueError, match="mask must be one of"):
        create_model("zorro_vit_demo", mask="dense")
    with pytest.raises(ValueError, match="divisible"):
        create_model("zorro_vit_demo", embed_dim=66, num_heads=4)


def test_overrides_reach_the_model():
    m = create_model(
        "zorro_vit_demo",
        depth=1,
        embed_dim=32,
        num_heads=2,
        num_fusion=3,
        img_size=16,
        num_frames=2,
        n_mels=16,
        audio_frames=32,
    )
    assert (m.embed_dim, len(m.blocks), m.num_fusion) == (32, 1, 3)
    assert m.config["img_size"] == 16 and m.preset == "zorro_vit_demo"
    x = m.example_inputs(batch_size=3)
    assert x["audio"].shape == (3, 16, 32) and x["video"].shape == (3, 2, 3, 16, 16)
    out = m(**x)
    assert set(out) == set(OUTPUTS) and all(v.shape == (3, 32) for v in out.values())


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_forward_shapes_and_finite(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = inputs(model)
    with torch.no_grad():
        out = model(audio=x["audio"], video=x["video"])
    assert set(out) == set(OUTPUTS)
    for k, v in out.items():
        assert v.shape == (2, model.embed_dim), k
        assert torch.isfinite(v).all(), k


@pytest.mark.full
@pytest.mark.parametrize("name", LARGE_PRESETS)
def test_large_preset_forward_shapes_and_finite(name):
    model = create_model(name).eval()
    x = inputs(model, batch=1)
    with torch.no_grad():
        out = model(**x)
    for k, v in out.items():
        assert v.shape == (1, model.embed_dim) and torch.isfinite(v).all(), k


@pytest.mark.parametrize("name", list_models())
def test_parameter_counts_are_reported(name):
    """Every preset instantiates (on the meta device: no memory, no init time); its count is the one in
    docs/models.md, so the documented table cannot go stale."""
    from pathlib import Path

    with torch.device("meta"):
        model = create_model(name)
    n = model.num_params()
    assert n > 0
    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    table = doc.split("\n## Presets\n")[1].split("\n### ")[0]  # the presets table, not the timings after it
    row = [line for line in table.splitlines() if line.startswith(f"| `{name}`")]
    assert len(row) == 1, f"docs/models.md has no (or several) table rows for {name}"
    documented = int(row[0].split("|")[2].strip().replace(",", ""))
    assert documented == n, f"{name}: docs/models.md says {documented:,} parameters, the model has {n:,}"


def test_figure2_token_counts():
    with torch.device("meta"):
        m = create_model("zorro_vit_base")
    assert m.audio_embed.max_tokens == 320 and m.video_embed.max_tokens == 1568
    assert (m.embed_dim, len(m.blocks)) == (768, 12)
    assert m.blocks[0].attn.num_heads == 12


# ---------------------------------------------------------------------------------------------------- purity
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("perturbed", ["video", "audio"])
def test_purity(backbone, perturbed):
    model = get_model(backbone)
    x = inputs(model)
    y = dict(x)
    y[perturbed] = x[perturbed] + torch.randn_like(x[perturbed])
    with torch.no_grad():
        a, b = model(**x), model(**y)
    kept = "audio" if perturbed == "video" else "video"
    assert_bitwise(a[kept], b[kept], f"{backbone}: {kept} output after perturbing {perturbed}")
    for name in (perturbed, "fusion", "global"):
        assert_moved(a[name], b[name], f"{backbone}: {name} output")


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_purity_with_ragged_lengths(backbone):
    model = get_model(backbone)
    x = inputs(model)
    al = torch.tensor([x["audio"].shape[2], x["audio"].shape[2] // 2])
    vl = torch.tensor([1, x["video"].shape[1]])
    y = dict(x, video=x["video"] + 1.0)
    with torch.no_grad():
        a = model(**x, audio_lengths=al, video_lengths=vl)
        b = model(**y, audio_lengths=al, video_lengths=vl)
    assert_bitwise(a["audio"], b["audio"], f"{backbone}: ragged audio output after perturbing video")
    assert_moved(a["video"], b["video"], f"{backbone}: ragged video output")


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("mask", ["full", "bottleneck"])
def test_full_and_bottleneck_masks_are_not_pure(backbone, mask):
    """Every family runs the ablation masks, and the purity check detects their leaks: the audio output must move
    with the video. (Swin's relative position bias lives within a window; full attention crosses windows, so Swin
    runs it without the bias.)"""
    extra = {"rel_pos_bias": False} if (backbone, mask) == ("swin", "full") else {}
    model = get_model(backbone, mask=mask, **extra)
    x = inputs(model)
    with torch.no_grad():
        a, b = model(**x), model(**dict(x, video=x["video"] + 1.0))
    assert all(v.isfinite().all() for v in a.values())
    assert_moved(a["audio"], b["audio"], f"{backbone}: {mask}-mask audio output")


def test_swin_full_mask_needs_no_window_bias():
    with pytest.raises(ValueError, match="rel_pos_bias=False"):
        create_model("zorro_swin_tiny", mask="full")


def test_purity_check_catches_the_reference_readout_bug(monkeypatch):
    """The public reimplementation's readout let the unimodal queries attend every token. Reproduce that slip in our
    readout rules: the audio output then moves with the video, which the purity tests above would flag."""
    monkeypatch.setattr(
        zorro_models.MaskedReadout, "rules", {"audio": "*", "video": "*", "fusion": ["fusion"], "global": "*"}
    )
    model = create_model("zorro_vit_demo", depth=1).eval()
    x = inputs(model)
    with torch.no_grad():
        a, b = model(**x), model(**dict(x, video=x["video"] + 1.0))
    assert_moved(a["audio"], b["audio"], "audio output under the buggy readout")


def test_readout_mask_routes_each_output():
    mask = zorro_models.MaskedReadout.mask_for((3, 4, 2))
    dense = mask.to_dense()
    expected = torch.zeros(4, 9, dtype=torch.bool)
    expected[0, 0:3] = True  # audio  -> audio tokens
    expected[1, 3:7] = True  # video  -> video tokens
    expected[2, 7:9] = True  # fusion -> fusion tokens
    expected[3, :] = True  # global -> everything
    assert torch.equal(dense, expected)


@pytest.mark.parametrize("shared", [True, False])
def test_vit_weight_sharing_modes_are_pure(shared):
    model = get_model("vit", shared_weights=shared, depth=2)
    x = inputs(model)
    with torch.no_grad():
        a, b = model(**x), model(**dict(x, video=-x["video"]))
    assert_bitwise(a["audio"], b["audio"], f"shared_weights={shared}: audio output")
    assert_moved(a["video"], b["video"], f"shared_weights={shared}: video output")
    if not shared:
        assert model.num_params() > get_model("vit", shared_weights=True, depth=2).num_params()


# ---------------------------------------------------------------------------------------------------- unimodal
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("modality", ["audio", "video"])
def test_unimodal_call_equals_multimodal_stream(backbone, modality):
    model = get_model(backbone)
    x = inputs(model)
    other = "video" if modality == "audio" else "audio"
    with torch.no_grad():
        both = model(**x)
        alone = model(**{modality: x[modality]})
    torch.testing.assert_close(alone[modality], both[modality], **SAME_MATH)
    assert torch.count_nonzero(alone[other]) == 0, f"absent {other} must give an all-zero embedding"
    for name in ("fusion", "global"):
        assert torch.isfinite(alone[name]).all() and alone[name].abs().sum() > 0
        assert_moved(alone[name], both[name], f"{backbone}: {name} output without {other}")


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_ragged_padding_is_ignored(backbone):
    """Frames past a sample's length never matter: filling them with NaN leaves every output bitwise unchanged."""
    model = get_model(backbone)
    x = inputs(model)
    fa, fv = x["audio"].shape[2], x["video"].shape[1]
    al, vl = torch.tensor([fa, fa // 2 + 1]), torch.tensor([fv // 2, fv])
    y = {"audio": x["audio"].clone(), "video": x["video"].clone()}
    y["audio"][1, :, fa // 2 + 1 :] = float("nan")
    y["video"][0, fv // 2 :] = float("nan")
    with torch.no_grad():
        a = model(**x, audio_lengths=al, video_lengths=vl)
        b = model(**y, audio_lengths=al, video_lengths=vl)
    for k in OUTPUTS:
        assert_bitwise(a[k], b[k], f"{backbone}: {k} output after perturbing padding")


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_zero_length_sample_has_zero_unimodal_output(backbone):
    model = get_model(backbone)
    x = inputs(model)
    al = torch.tensor([x["audio"].shape[2], 0])
    with torch.no_grad():
        feats = model.forward_features(**x, audio_lengths=al)
        first = model(audio=x["audio"][:1], video=x["video"][:1])
        second_video_only = model(video=x["video"][1:])
    out, present = feats.embeddings, feats.present
    assert present["audio"].tolist() == [True, False] and present["video"].tolist() == [True, True]
    assert torch.count_nonzero(out["audio"][1]) == 0
    torch.testing.assert_close(out["audio"][:1], first["audio"], **SAME_MATH)
    for k in ("video", "fusion", "global"):
        torch.testing.assert_close(out[k][1:], second_video_only[k], **SAME_MATH)


def test_vit_ragged_sample_equals_truncated_call():
    model = get_model("vit")
    x = inputs(model)
    pt = model.audio_embed.patch[1]
    la, lv = 3 * pt, 2
    with torch.no_grad():
        ragged = model(**x, audio_lengths=torch.tensor([x["audio"].shape[2], la]), video_lengths=torch.tensor([4, lv]))
        short = model(audio=x["audio"][1:, :, :la], video=x["video"][1:, :lv])
    for k in OUTPUTS:
        torch.testing.assert_close(ragged[k][1:], short[k], **SAME_MATH)


def test_masks_are_built_once_per_layout():
    model = create_model("zorro_vit_demo", depth=2)
    x = inputs(model)
    model(**x)
    n = len(model._masks)
    model(**inputs(model, seed=3))
    assert len(model._masks) == n, "same layout, no new masks"
    model(**x, audio_lengths=torch.tensor([64, 10]))
    assert len(model._masks) > n


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_parameter_gets_a_finite_gradient(backbone):
    name, overrides = BACKBONES[backbone]
    model = create_model(name, **overrides)
    x = inputs(model)
    out = model(**x)
    sum(v.pow(2).sum() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [n for n, p in model.named_parameters() if torch.count_nonzero(p.grad) == 0]
    assert not zero, f"all-zero gradients: {zero}"


def test_vit_modality_specific_weights_all_get_gradients():
    """Each stream's own weights get a finite gradient that is not all zero (a stream routed through another stream's
    weights, or multiplied out, leaves its own with None or zero gradients)."""
    model = create_model("zorro_vit_demo", depth=1, shared_weights=False)
    out = model(**inputs(model))
    sum(v.pow(2).sum() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0, f"{name}: all-zero gradient"
    per_stream = {n.split("per_stream.")[1].split(".")[0] for n, _ in model.named_parameters() if "per_stream." in n}
    assert per_stream == {"audio", "video", "fusion"}


def test_torch_compile_matches_eager():
    """The compiled model against the same model in float64, under the dtype rule of zorro_kernels.testing: its error
    (outputs and every parameter's gradient) at most twice eager fp32's error plus the fp32 floor. A fixed absolute
    tolerance failed on gradients whose rounding noise alone reaches it."""
    torch._dynamo.reset()
    model = create_model("zorro_vit_demo", depth=1)
    model64 = copy.deepcopy(model).double()
    x = inputs(model)
    x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    runs = {"eager": model(**x), "compiled": torch.compile(model)(**x), "fp64": model64(**x64)}
    for k in OUTPUTS:
        assert_within_policy(f"compiled {k}", runs["compiled"][k], runs["eager"][k], runs["fp64"][k], torch.float32)
    names = [n for n, _ in model.named_parameters()]
    grads = {
        run: torch.autograd.grad(
            sum(v.sum() for v in out.values()), list((model64 if run == "fp64" else model).parameters())
        )
        for run, out in runs.items()
    }
    for n, got, same, ref in zip(names, grads["compiled"], grads["eager"], grads["fp64"]):
        assert_within_policy(f"compiled d{n}", got, same, ref, torch.float32)


def test_torch_compile_fullgraph():
    """No graph break anywhere in the model: zorro_attention runs behind its custom ops under compilation."""
    torch._dynamo.reset()
    model = create_model("zorro_vit_demo", depth=1)
    x = inputs(model)
    compiled = torch.compile(model, fullgraph=True)(**x)
    eager = model(**x)
    for k in OUTPUTS:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)
    grads = []
    for out in (compiled, eager):
        model.zero_grad()
        sum(o.square().sum() for o in out.values()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):  # inductor fuses the fp32 reductions differently: rounding-level differences
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- input errors
def test_input_validation():
    model = get_model("vit")
    x = inputs(model)
    with pytest.raises(ValueError, match="neither"):
        model()
    with pytest.raises(ValueError, match="n_mels"):
        model(audio=x["audio"][:, :-1])
    with pytest.raises(ValueError, match="frames"):
        model(audio=torch.cat([x["audio"], x["audio"]], 2))
    with pytest.raises(ValueError, match=r"\(B, T, 3"):
        model(video=x["video"][..., :-1])
    with pytest.raises(ValueError, match="batch size"):
        model(audio=x["audio"], video=x["video"][:1])
    with pytest.raises(TypeError, match="float"):
        model(audio=x["audio"].long())
    with pytest.raises(ValueError, match="audio_lengths"):
        model(**x, audio_lengths=torch.tensor([1, 10**6]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model(**x, video_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="video is None"):
        model(audio=x["audio"], video_lengths=torch.tensor([1, 1]))


@pytest.mark.parametrize("backbone", ["vit", "swin", "hip"])
def test_empty_batch_and_wrong_dtype_are_named_at_the_entry(backbone):
    """B=0 failed inside attention ("q and k must have non-zero B"); fp64 inputs to fp32 weights failed in the first
    matmul ("mat1 and mat2 must have the same dtype"), naming neither input."""
    model = get_model(backbone)
    x = inputs(model)
    with pytest.raises(ValueError, match=r"audio has batch size 0 \(shape \(0, "):
        model(audio=x["audio"][:0], video=x["video"][:0])
    with pytest.raises(ValueError, match="video has batch size 0"):
        model(video=x["video"][:0])
    with pytest.raises(TypeError, match=r"video is torch.float64 but the model's weights are torch.float32"):
        model(audio=x["audio"], video=x["video"].double())
    with pytest.raises(TypeError, match=r"audio is torch.float16 but"):
        model(audio=x["audio"].half())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op: any float input is fine
        assert model(audio=x["audio"].bfloat16())["audio"].shape == (x["audio"].shape[0], model.embed_dim)


# ---------------------------------------------------------------------------------------------------- full tier
@pytest.mark.full
@pytest.mark.parametrize("backbone", ["swin", "hip"])
def test_torch_compile_matches_eager_swin_hip(backbone):
    torch._dynamo.reset()
    name, overrides = BACKBONES[backbone]
    model = create_model(name, **overrides)
    x = inputs(model)
    eager = model(**x)
    compiled = torch.compile(model)(**x)
    for k in OUTPUTS:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_cuda_purity_gradients_and_agreement_with_cpu(backbone):
    """On the GPU (zorro_attention's Triton backend): bitwise purity both ways, finite gradients, and agreement with
    the CPU model (loose: TF32 / different kernels; the attention itself is checked against fp64 elsewhere)."""
    cpu_model = get_model(backbone)
    model = create_model(BACKBONES[backbone][0], **BACKBONES[backbone][1]).cuda().eval()
    model.load_state_dict(cpu_model.state_dict())
    x = inputs(model)
    xc = {k: v.cuda() for k, v in x.items()}
    with torch.no_grad():
        ref = cpu_model(**x)
        a = model(**xc)
        b = model(**dict(xc, video=xc["video"] + 1.0))
        c = model(**dict(xc, audio=xc["audio"] + 1.0))
    assert_bitwise(a["audio"], b["audio"], f"{backbone} (cuda): audio output after perturbing video")
    assert_bitwise(a["video"], c["video"], f"{backbone} (cuda): video output after perturbing audio")
    for k in OUTPUTS:
        torch.testing.assert_close(a[k].cpu(), ref[k], rtol=2e-2, atol=2e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.train()(**xc, audio_lengths=torch.tensor([x["audio"].shape[2], 7]))
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
