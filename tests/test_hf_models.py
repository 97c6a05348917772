"""Hugging Face models on ``attn_implementation="zorro"`` beyond plain text: PaliGemma, Gemma 3 and Gemma 4 image+text,
packed sequences given by ``position_ids`` resets, and the models zorro refuses (GIT). Tiny random configs, no
downloads.

Each strict test runs ``register(strict=True)`` (a fallback to sdpa raises) and checks the model against its twin with
the same weights on transformers' own implementation ("sdpa", or "eager" where sdpa computes another mask): logits
within the project's float32 policy (zorro_kernels.testing, against the model in float64), identical greedy tokens,
every parameter gradient finite and equal to the twin's within tolerance.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from zorro_kernels import ZorroMask
from zorro_kernels.integrations import fallback_counts
from zorro_kernels.testing import assert_within_policy

from .helpers import no_stale_fallbacks  # noqa: F401 (an autouse fixture)

transformers = pytest.importorskip("transformers")
F32 = torch.float32


@pytest.fixture(scope="module")
def zt():
    from zorro_kernels.integrations import transformers as zt

    zt.register()
    return zt


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: each matmul is microseconds of work, and several threads on a busy machine make it milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def zorro_masks(zt, monkeypatch):
    """The masks the integration passed to zorro_attention, in call order (proof the zorro path ran)."""
    calls = []
    real = zt.zorro_attention

    def spy(q, k, v, mask, **kwargs):
        calls.append(mask)
        return real(q, k, v, mask, **kwargs)

    monkeypatch.setattr(zt, "zorro_attention", spy)
    return calls


def _pair(model_cls, cfg, same: str = "sdpa", seed: int = 0) -> SimpleNamespace:
    """The same random weights on ``same`` (the implementation zorro must equal), on "zorro", and on ``same`` in
    float64 (the reference), all in eval mode."""
    torch.manual_seed(seed)
    torch_model = model_cls(copy.deepcopy(cfg)).eval()
    torch_model.set_attn_implementation(same)
    zorro = copy.deepcopy(torch_model)
    zorro.set_attn_implementation("zorro")
    return SimpleNamespace(same=torch_model, zorro=zorro, ref64=copy.deepcopy(torch_model).double(), cfg=cfg)


def _double(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def assert_logits_match(pair, **inputs) -> torch.Tensor:
    """Logits at the real tokens (a left-padded query sees no key: zorro gives 0 there, the others their own
    values, which nothing reads)."""
    with torch.no_grad():
        got = pair.zorro(**inputs).logits
        same = pair.same(**inputs).logits
        ref = pair.ref64(**_double(inputs)).logits
    real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(got.shape[:2], dtype=bool)
    assert_within_policy("logits", got[real], same[real], ref[real], F32)
    return got


def assert_greedy_match(pair, new_tokens: int = 6, **inputs) -> torch.Tensor:
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = pair.same.generate(**inputs, **kw)
        got = pair.zorro.generate(**inputs, **kw)
    assert torch.equal(got, want)
    return got


def assert_gradients_match(pair, **inputs) -> None:
    """One training step (loss.backward on ``inputs``, which carry labels) on both: every parameter gradient finite
    and equal to the twin's."""
    want = _gradients(pair.same, lambda: pair.same(**inputs).loss.backward())
    assert_same_gradients(_gradients(pair.zorro, lambda: pair.zorro(**inputs).loss.backward()), want)


def _gradients(model, step) -> dict:
    """The parameter gradients ``step()`` leaves on ``model`` (which starts and ends without any)."""
    model.zero_grad(set_to_none=True)
    step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(got: dict, want: dict) -> None:
    """Every gradient in ``got`` finite, and the same parameters as in ``want`` with equal gradients."""
    bad = [n for n, g in got.items() if not torch.isfinite(g).all()]
    assert not bad, f"{len(bad)} non-finite parameter gradients: {bad[:4]}"
    assert want.keys() == got.keys() and got
    for n, g in got.items():
        # atol scaled by the gradient's size: Gemma 3's zero-initialised image projection gets gradients near 1e9
        scale = max(1.0, want[n].abs().max().item())
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


def _left_padding(lengths, n: int) -> torch.Tensor:
    return (torch.arange(n)[None] >= n - torch.tensor(lengths)[:, None]).long()


# ============================================================================================ the mask interface
def _build_mask(impl: str, n: int, *, sliding: bool = False, position_ids=None, blocks=None, batch: int = 2):
    """What transformers' own ``create_causal_mask`` / ``create_sliding_window_causal_mask`` build for ``impl``
    (its composition of mask functions, handed to that implementation's mask interface)."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = LlamaConfig(attn_implementation=impl, sliding_window=3)
    kw = dict(config=cfg, inputs_embeds=torch.zeros(batch, n, 8), attention_mask=None, cache=None)
    kw["position_ids"] = position_ids if position_ids is not None else torch.arange(n)[None]
    if sliding:
        return create_sliding_window_causal_mask(**kw, allow_is_causal_skip=False)
    return create_causal_mask(**kw, block_sequence_ids=blocks, allow_is_causal_skip=False)


def _restarts(*lens_per_sample) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in lens_per_sample])


@pytest.mark.parametrize(
    "case",
    [
        dict(position_ids=_restarts([5, 7, 4])),
        dict(position_ids=_restarts([5, 7, 4], [5, 7, 4])),
        dict(position_ids=_restarts([5, 7, 4]), sliding=True),
        dict(position_ids=_restarts([16]) + 3),  # one sequence from position 3: not packed
        dict(blocks=torch.full((2, 16), -1)),  # PaliGemma's generate without token_type_ids: no block
        dict(position_ids=_restarts([5, 7, 4], [9, 7], [5, 7, 4])),  # one zorro call per distinct packing
        dict(position_ids=_restarts([3, 13], [16]), sliding=True),
    ],
    ids=["packed", "packed-batch", "packed-sliding", "offset", "no-blocks", "packed-per-sample", "sliding-per-sample"],
)
def test_mask_interface_reads_transformers_compositions(zt, case):
    """The mask functions transformers composes (packing from position_ids: a position remap and a packed-sequence
    AND; sliding windows; block overlays) become ZorroMasks equal to the dense mask sdpa gets."""
    batch = case["position_ids"].shape[0] if "position_ids" in case else 2
    got = _build_mask("zorro", 16, batch=batch, **case)
    want = _build_mask("sdpa", 16, batch=batch, **case)
    assert isinstance(got, ZorroMask), getattr(got, "_zorro_fallback_reason", type(got))
    per_sample = case.get("position_ids", torch.zeros(1)).unique(dim=0).shape[0] > 1
    assert (got.sample_sizes is not None) == per_sample  # one mask, each sample's boundaries its own
    assert torch.equal(_dense(got, batch), want[:, 0])


def test_attention_reads_an_unread_layout_once(zt, zorro_masks, monkeypatch):
    """Under torch.compile a call with zorro_mask= gets the packed layout from the mask interface unread (reading it
    is a graph break, which fullgraph=True forbids); an attention call without zorro_mask= reads it itself, once for
    every layer, and runs on zorro with it."""
    args = []
    read = zt._layout_from_model

    def spy(*a):
        args.append(a)
        return read(*a)

    monkeypatch.setattr(zt, "_layout_from_model", spy)
    _build_mask("zorro", 16, position_ids=_restarts([5, 7, 4]))
    unread = zt._Unread("packed", args[0], {})
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    layer = SimpleNamespace(is_causal=True)
    got = [zt.zorro_attention_forward(layer, q, k, v, unread)[0] for _ in range(2)]
    assert len(args) == 2  # read once, by the first call
    assert [m.q_sizes for m in zorro_masks] == [(5, 7, 4)] * 2
    want = zt.zorro_attention_forward(layer, q, k, v, ZorroMask.packed([5, 7, 4], causal=True))[0]
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def _dense(layout, batch: int) -> torch.Tensor:
    """``(B, Nq, Nk)`` bool: what a ZorroMask, ZorroLayout or ZorroGroups from the mask interface lets each query
    see (a key bias of -inf hides the key)."""
    from zorro_kernels.integrations.transformers import ZorroGroups, ZorroLayout

    if isinstance(layout, ZorroGroups):
        parts = [(rows.tolist(), mask, bias) for rows, mask, bias in layout.groups]
    elif isinstance(layout, ZorroLayout):
        parts = [(list(range(batch)), layout.mask, layout.bias)]
    else:
        parts = [(list(range(batch)), layout, None)]
    dense = [None] * batch
    for rows, mask, bias in parts:
        full = mask.to_dense()
        for i, b in enumerate(rows):
            dense[b] = full[i] if full.ndim == 3 else full  # (B, Nq, Nk) with per-sample sizes
            if bias is not None:
                dense[b] = dense[b] & (bias[i, 0] > float("-inf"))
    return torch.stack(dense)


def test_mask_interface_block_id_on_several_runs_groups_samples(zt):
    """PaliGemma's prefix ids are ``where(token_type_ids == 0, 0, -1)``: type-0 tokens after the answer share the
    prefix's id, and transformers lets those runs see each other both ways. That is no text/blocks layout: one rule
    table per distinct layout (ZorroGroups), still no dense mask, equal to what sdpa gets."""
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    blocks = torch.where(types == 0, 0, -1)
    got = _build_mask("zorro", 12, blocks=blocks)
    want = _build_mask("sdpa", 12, blocks=blocks)
    assert isinstance(got, zt.ZorroGroups) and len(got.groups) == 2
    assert torch.equal(_dense(got, 2), want[:, 0])
    # the attention function: one call per group, assembled per sample; output and gradients equal sdpa's
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    qkv = [torch.randn(2, 2, 12, 8, requires_grad=True) for _ in range(3)]
    outs = [zt.zorro_attention_forward(module, *qkv, got)[0], sdpa_attention_forward(module, *qkv, want)[0]]
    grads = [torch.autograd.grad(o, qkv, torch.ones_like(o)) for o in outs]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def _image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Gemma 3's block ids: one id per run of image tokens (token type 1), -1 on text."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    return get_block_sequence_ids_for_mask(token_type_ids)


@pytest.mark.parametrize(
    "types, pads",
    [
        ([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]] * 2, [0, 0]),
        ([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]], [0, 3]),
        ([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]] * 2, [2, 0]),
    ],
    ids=["same-images", "per-sample-left-padded", "image-first-padded"],
)
def test_mask_interface_reads_image_blocks(zt, types, pads):
    """Gemma 3's image masks (full layers: causal OR image blocks; sliding layers: that AND a window of 3), built by
    its own create_masks_for_vision_model, with left padding: rule cells (per sample where the images sit
    differently), equal to the dense masks sdpa gets."""
    from transformers import LlamaConfig
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

    n, batch = 16, len(types)
    blocks = _image_blocks(torch.tensor(types))
    attention_mask = (torch.arange(n)[None] >= torch.tensor(pads)[:, None]).long()
    masks = {}
    for impl in ("zorro", "sdpa"):
        masks[impl] = create_masks_for_vision_model(
            config=LlamaConfig(attn_implementation=impl, sliding_window=3),
            inputs_embeds=torch.zeros(batch, n, 8),
            attention_mask=attention_mask,
            cache=None,
            position_ids=torch.arange(n)[None],
            block_sequence_ids=blocks,
        )
    for kind, want in masks["sdpa"].items():
        got = masks["zorro"][kind]
        assert not isinstance(got, torch.Tensor), got._zorro_fallback_reason
        assert torch.equal(_dense(got, batch), want[:, 0]), kind
        # one mask: per-sample sizes where the images sit differently; padding is a key bias
        assert (getattr(got, "mask", got).sample_sizes is not None) == (len(set(map(tuple, types))) > 1)


def test_mask_interface_reads_image_blocks_with_a_cache_offset(zt):
    """Image blocks whose queries are only the last keys (a chunk of a prefill over a cache: q_offset > 0, kv_offset
    > 0 for a sliding cache), on 60 seeded random layouts (up to two images per sample, cut anywhere by the chunk),
    with a window of 4 on a third of them and left padding on a fifth: a cross-attention rule-cell mask equal to the
    dense mask sdpa gets, never a fallback."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sdpa_mask,
        sliding_window_overlay,
    )

    gen = torch.Generator().manual_seed(0)
    n, batch = 20, 2
    for case in range(60):
        types = torch.zeros(batch, n, dtype=torch.long)
        for b in range(batch):
            for _ in range(int(torch.randint(0, 3, (), generator=gen))):
                start = int(torch.randint(0, n - 3, (), generator=gen))
                types[b, start : start + int(torch.randint(1, 5, (), generator=gen))] = 1
        kv_offset = int(torch.randint(0, 6, (), generator=gen)) if case % 2 else 0
        kv_length = int(torch.randint(4, n - kv_offset + 1, (), generator=gen))
        q_length = int(torch.randint(1, kv_length + 1, (), generator=gen))
        fn = or_masks(causal_mask_function, blockwise_overlay(_image_blocks(types)))
        if case % 3 == 0:
            fn = and_masks(fn, sliding_window_overlay(4))
        pads = None if case % 5 else (torch.arange(n)[None] >= torch.tensor([0, 2])[:, None])
        args = dict(batch_size=batch, q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, mask_function=fn)
        args.update(q_offset=kv_offset + kv_length - q_length, attention_mask=pads)
        got = zt.zorro_mask_interface(**args)
        assert not isinstance(got, torch.Tensor), got._zorro_fallback_reason
        want = sdpa_mask(**args, allow_is_causal_skip=False)
        assert torch.equal(_dense(got, batch), want[:, 0]), (case, types.tolist(), q_length, kv_length, kv_offset)


def test_mask_interface_reads_image_blocks_in_a_static_cache(zt):
    """Image blocks over a static cache's 20 slots (``held`` filled before ``nq`` queries, the offset an int or a
    tensor), on 60 seeded random layouts with a window as long as the cache on a third and left padding on a
    quarter: rule cells whose last key segment carries the empty slots, never visited, equal to sdpa's dense mask.
    Block ids on empty slots (token_type_ids longer than the filled tokens) would let queries see them: refused."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sdpa_mask,
        sliding_window_overlay,
    )

    gen = torch.Generator().manual_seed(0)
    n, batch = 20, 2
    for case in range(61):
        held, nq = int(torch.randint(0, 10, (), generator=gen)), int(torch.randint(1, 8, (), generator=gen))
        types = torch.zeros(batch, n, dtype=torch.long)
        for b in range(batch):
            for _ in range(int(torch.randint(0, 3, (), generator=gen))):
                start = int(torch.randint(0, held + nq, (), generator=gen))
                types[b, start : start + int(torch.randint(1, 5, (), generator=gen))] = 1
        types[:, held + nq :] = 0
        if case == 60:  # an image running past the filled tokens
            types[0, held + nq - 1 : held + nq + 1] = 1
        fn = or_masks(causal_mask_function, blockwise_overlay(_image_blocks(types)))
        if case % 3 == 0:
            fn = and_masks(fn, sliding_window_overlay(n))
        pads = None if case % 4 else (torch.arange(held + nq)[None] >= torch.tensor([0, 2])[:, None])
        args = dict(batch_size=batch, q_length=nq, kv_length=n, kv_offset=0, mask_function=fn, attention_mask=pads)
        args.update(q_offset=held if case % 2 else torch.tensor(held), allow_is_causal_skip=False)
        got = zt.zorro_mask_interface(**args)
        if case == 60:
            assert "empty slots carry block ids" in got._zorro_fallback_reason
            continue
        assert not isinstance(got, torch.Tensor), got._zorro_fallback_reason
        assert torch.equal(_dense(got, batch), sdpa_mask(**args)[:, 0]), (case, types.tolist(), held, nq)


# ============================================================================================ PaliGemma
@pytest.fixture(scope="module")
def paligemma(zt):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(
        text_config=dict(
            model_type="gemma",
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=32,
        ),
        image_token_id=127,
        projection_dim=32,
    )
    # "eager", not "sdpa": PaliGemma's Gemma has is_causal=False (its prefix is bidirectional) and transformers skips
    # the plain causal mask for sdpa, which then runs without one and attends bidirectionally everywhere (the answer
    # sees its future) when no token_type_ids are given; eager builds the causal mask, as zorro does
    pair = _pair(PaliGemmaForConditionalGeneration, cfg, same="eager")
    # the float64 reference: eager in float64 turns a left-padded row's masked scores (float64's min) into -inf in
    # its float32 softmax, and the NaN spreads to every row; sdpa in float64 with the skip above undone is exact
    pair.ref64.set_attn_implementation("sdpa")
    for layer in pair.ref64.model.language_model.layers:
        layer.self_attn.is_causal = True
    pair.image_tokens = cfg.text_config.num_image_tokens  # 4: (16 / 8) ** 2
    pair.layers = 2
    return pair


def _paligemma_batch(pg, prompt: int = 5, answer: int = 0, pads=(0, 0)):
    """Per sample: [left padding][image tokens][prompt] (token_type_ids 0: the bidirectional prefix) [answer] (1:
    causal). Returns (model inputs with an attention_mask when padded, token_type_ids)."""
    n = pg.image_tokens + prompt + answer
    ids = torch.randint(1, 100, (len(pads), n))
    token_type_ids = torch.zeros_like(ids)
    for b, pad in enumerate(pads):
        ids[b, :pad] = 0
        ids[b, pad : pad + pg.image_tokens] = pg.cfg.image_token_id
    token_type_ids[:, n - answer :] = 1
    inputs = dict(input_ids=ids, pixel_values=torch.randn(len(pads), 3, 16, 16))
    if any(pads):
        inputs["attention_mask"] = _left_padding([n - p for p in pads], n)
    return inputs, token_type_ids


@pytest.mark.parametrize("pads", [(0, 0), (0, 2)], ids=["unpadded", "left-padded"])
def _paligemma_labels(pg, inputs, token_type_ids=None) -> torch.Tensor:
    """Loss on the text (the answer when token types are given), not on images or padding."""
    ids = inputs["input_ids"]
    skip = (ids == pg.cfg.image_token_id) | (ids == 0)
    if token_type_ids is not None:
        skip |= token_type_ids == 0
    return ids.masked_fill(skip, -100)


@pytest.mark.parametrize("pads", [(0, 0), (0, 2)], ids=["unpadded", "left-padded"])
def test_paligemma_prefix_lm_runs_on_zorro(paligemma, zt, zorro_masks, strict, pads):
    """PaliGemma with token_type_ids: image + prompt (type 0) a bidirectional prefix, the answer causal. transformers
    ORs the causal mask with one block over the prefix; the mask interface makes it rule cells (prefix full, answer
    causal) instead of falling back. Forward, greedy generate and a training step on the answer, strict, equal to
    eager (and to sdpa, which gets this mask materialized)."""
    inputs, token_type_ids = _paligemma_batch(paligemma, prompt=3, answer=4, pads=pads)
    assert_logits_match(paligemma, **inputs, token_type_ids=token_type_ids)
    cells = [getattr(m, "mask", m) for m in zorro_masks]
    cells = [m for m in cells if m.has_causal_cells]
    assert len(cells) == paligemma.layers
    assert cells[0].q_sizes == (0, paligemma.image_tokens + 3, 4)  # no text, the prefix (padding included), answer
    zorro_masks.clear()
    assert_greedy_match(paligemma, **inputs, token_type_ids=token_type_ids)
    labels = _paligemma_labels(paligemma, inputs, token_type_ids)
    assert_gradients_match(paligemma, **inputs, token_type_ids=token_type_ids, labels=labels)
    assert fallback_counts() == {}


@pytest.mark.parametrize("pads", [(0, 0), (0, 2)], ids=["unpadded", "left-padded"])
def test_paligemma_without_token_type_ids_runs_on_zorro(paligemma, zt, zorro_masks, strict, pads):
    """PaliGemma builds the mask once and hands it to its inner Gemma, whose mask preprocessing read
    ``attention_mask.ndim`` on our ZorroMask (AttributeError); it now passes it through like a 4-D mask (left padding:
    a ZorroLayout, the same way). Forward, greedy generate (prefill plus cached steps) and a training step, strict:
    all on zorro, equal to eager."""
    inputs, _ = _paligemma_batch(paligemma, pads=pads)
    assert_logits_match(paligemma, **inputs)
    assert zorro_masks
    zorro_masks.clear()
    assert_greedy_match(paligemma, **inputs)
    text = [getattr(m, "mask", m) for m in zorro_masks]
    text = [m for m in text if m.causal]
    assert [m.num_q for m in text[:: paligemma.layers]] == [inputs["input_ids"].shape[1]] + [1] * 5
    assert_gradients_match(paligemma, **inputs, labels=_paligemma_labels(paligemma, inputs))
    assert fallback_counts() == {}


@pytest.mark.full  # tracing and compiling PaliGemma forward and backward: tens of seconds on the CI machine
def test_paligemma_compiled_shows_zorro_ops_in_the_profiler(paligemma, zt, strict):
    """torch.compile(fullgraph=True) of PaliGemma (its mask built once, passed through to the inner Gemma, padding
    as a key bias since values cannot be read while tracing): the zorro:: custom ops run in the forward and the
    backward, no fallback, logits equal eager's."""
    inputs, _ = _paligemma_batch(paligemma, pads=(0, 2))
    with torch.no_grad():
        # warm the integration's layout cache, so the trace reads built layouts: building a ZorroMask inside a
        # trace fails since rule cells (AllowRuns' numpy branches on data under dynamo)
        paligemma.zorro(**inputs)
    torch._dynamo.reset()
    compiled = torch.compile(paligemma.zorro, fullgraph=True, backend="aot_eager")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = compiled(**inputs).logits
        logits.sum().backward()
    paligemma.zorro.zero_grad(set_to_none=True)
    ops = {e.key for e in prof.key_averages()}
    assert {"zorro::attention_fwd", "zorro::attention_bwd"} <= ops, sorted(k for k in ops if "zorro" in k)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        same = paligemma.same(**inputs).logits
        ref = paligemma.ref64(**_double(inputs)).logits
    assert_within_policy("compiled logits", logits.detach()[real], same[real], ref[real], F32)
    assert fallback_counts() == {}


# ============================================================================================ Gemma 3
@pytest.fixture(scope="module")
def gemma3(zt):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        mm_tokens_per_image=4,
        image_token_id=127,
        boi_token_id=125,
        eoi_token_id=126,
    )
    pair = _pair(Gemma3ForConditionalGeneration, cfg)
    pair.layers = 2
    return pair


def _gemma3_batch(g3, n: int, starts, pads) -> dict:
    """Per sample: left padding, text, one image of 4 tokens at ``start`` (after the padding), text."""
    ids = torch.randint(1, 100, (len(starts), n))
    for b, (start, pad) in enumerate(zip(starts, pads)):
        ids[b, :pad] = 0
        ids[b, pad + start : pad + start + 4] = g3.cfg.image_token_id
    return dict(
        input_ids=ids,
        pixel_values=torch.randn(len(starts), 3, 16, 16),
        token_type_ids=(ids == g3.cfg.image_token_id).long(),
        attention_mask=_left_padding([n - p for p in pads], n),
    )


def test_gemma3_images_run_on_zorro(gemma3, zt, zorro_masks, strict):
    """Gemma 3 image+text, images at other positions per sample, left padded: each layer (a sliding one with a window
    of 4, a full one) runs one rule-cell mask (images bidirectional, text causal) with per-sample segment sizes, the
    padding as a key bias; logits equal sdpa's. Then batched greedy generation (prefill with the images, cached steps
    plain causal) and a training step, strict, with sdpa's tokens and gradients."""
    inputs = _gemma3_batch(gemma3, 12, starts=[3, 5, 0], pads=[0, 2, 3])  # images at 3, 7, 3
    assert_logits_match(gemma3, **inputs)
    cells = [m for m in zorro_masks if m.has_causal_cells]
    assert [m.window for m in cells] == [(3, -1), None]  # the sliding layer, the full layer: one call each
    assert cells[0].sample_sizes.tolist() == [[3, 4, 5], [7, 4, 1], [3, 4, 5]]  # text (padding included), image, text
    zorro_masks.clear()
    tokens = assert_greedy_match(gemma3, **inputs)
    assert tokens.shape[1] == 12 + 6
    labels = inputs["input_ids"].masked_fill(inputs["token_type_ids"].bool() | (inputs["attention_mask"] == 0), -100)
    assert_gradients_match(gemma3, **inputs, labels=labels)
    assert fallback_counts() == {}


def test_gemma3_chunked_prefill_over_images_runs_on_zorro(gemma3, zt, zorro_masks, strict):
    """A prefill in chunks over a DynamicCache whose boundaries cut images (token_type_ids up to each chunk's end, as
    generate's prefill_chunk_size passes them): each chunk's queries are the last keys, the images' runs cut to them;
    rule cells aligned bottom-right per pair express it (was a fallback: blocks with a cache offset). Logits equal
    sdpa's chunk by chunk, left padding and the sliding layer included."""
    from transformers import DynamicCache

    inputs = _gemma3_batch(gemma3, 12, starts=[3, 5, 0], pads=[0, 2, 3])  # images at 3-6, 7-10, 3-6
    types, pads = inputs["token_type_ids"], inputs["attention_mask"]
    embeds = gemma3.same.get_input_embeddings()(inputs["input_ids"]).detach()
    chunks = [(0, 5), (5, 9), (9, 12)]
    logits = {}
    for name in ("zorro", "same", "ref64"):
        model = getattr(gemma3, name)
        cache = DynamicCache(config=model.config.get_text_config())
        x = embeds.double() if name == "ref64" else embeds
        with torch.no_grad():
            logits[name] = [
                model(
                    inputs_embeds=x[:, s:e],
                    token_type_ids=types[:, :e],
                    attention_mask=pads[:, :e],
                    past_key_values=cache,
                ).logits
                for s, e in chunks
            ]
    for (s, e), got, same, ref in zip(chunks, logits["zorro"], logits["same"], logits["ref64"]):
        real = pads[:, s:e].bool()
        assert_within_policy(f"chunk {s}-{e}", got[real], same[real], ref[real], F32)
    cross = [m for m in zorro_masks if m.has_causal_cells and m.num_q < m.num_kv]
    assert len(cross) == 2 * gemma3.layers  # the second and third chunks, on both layers
    assert fallback_counts() == {}


def test_gemma3_static_cache_generate_with_images_runs_on_zorro(gemma3, zt, zorro_masks, strict):
    """Batched, left-padded greedy generate with images and cache_implementation="static", strict: the prefill's
    keys are the cache's slots, past the prompt's tokens (the full layer; the sliding layer's 4 slots fill), so its
    rule cells carry the empty slots as never-visited keys at the end of the last text segment. Tokens equal sdpa's
    (was a fallback: blocks with a static cache)."""
    inputs = _gemma3_batch(gemma3, 12, starts=[3, 5, 0], pads=[0, 2, 3])
    tokens = assert_greedy_match(gemma3, **inputs, cache_implementation="static")
    assert tokens.shape[1] == 12 + 6
    prefill = [getattr(m, "mask", m) for m in zorro_masks if getattr(m, "mask", m).has_causal_cells]
    assert any(m.num_kv > m.num_q and m.kv_lengths is not None for m in prefill)  # the full layer's empty slots
    assert fallback_counts() == {}


@pytest.mark.full  # compiling Gemma 3 forward and backward: tens of seconds
def test_gemma3_images_compiled_run_on_zorro(gemma3, zt, strict):
    """torch.compile (graph breaks allowed) of Gemma 3 with images, strict: the image positions are tensor values, so
    the integration builds the layout eagerly at a graph break; the zorro:: ops run forward and backward, and a
    second batch with the images elsewhere gets its own layout. Logits equal sdpa's."""
    torch._dynamo.reset()
    compiled = torch.compile(gemma3.zorro, backend="aot_eager")
    for starts in ([3, 5, 0], [1, 2, 4]):
        inputs = _gemma3_batch(gemma3, 12, starts=starts, pads=[0, 2, 3])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = compiled(**inputs).logits
            logits.sum().backward()
        gemma3.zorro.zero_grad(set_to_none=True)
        ops = {e.key for e in prof.key_averages()}
        assert {"zorro::attention_fwd", "zorro::attention_bwd"} <= ops, sorted(k for k in ops if "zorro" in k)
        real = inputs["attention_mask"].bool()
        with torch.no_grad():
            same, ref = gemma3.same(**inputs).logits, gemma3.ref64(**_double(inputs)).logits
        assert_within_policy(f"images at {starts}", logits.detach()[real], same[real], ref[real], F32)
    assert fallback_counts() == {}


# ============================================================================================ Gemma 4
@pytest.fixture(scope="module")
def gemma4(zt):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    cfg = Gemma4Config(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            global_head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=64,
            use_bidirectional_attention="vision",  # vision tokens see their whole image, text is causal
            vocab_size_per_layer_input=128,
            hidden_size_per_layer_input=8,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,
            pooling_kernel_size=3,
            position_embedding_size=64,
        ),
        audio_config=None,
        image_token_id=127,
        boi_token_id=125,
        eoi_token_id=126,
        video_token_id=124,
        audio_token_id=123,
        boa_token_id=122,
        eoa_token_index=121,
    )
    pair = _pair(Gemma4ForConditionalGeneration, cfg)
    pair.layers = 2
    return pair


def _gemma4_batch(g4, n: int, starts, pads) -> dict:
    """Per sample: left padding, text, one image at ``start`` (36 patches of 4 x 4 pooled 3 x 3: 4 tokens), text."""
    batch = _gemma3_batch(g4, n, starts, pads)
    grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(36, 2)
    return dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch.pop("token_type_ids"),
        pixel_values=torch.rand(len(starts), 36, 48),
        image_position_ids=grid[None].expand(len(starts), -1, -1).contiguous(),
    )


def test_gemma4_vision_blocks_run_on_zorro(gemma4, zt, zorro_masks, strict):
    """Gemma 4 with bidirectional vision blocks (use_bidirectional_attention="vision"): Gemma 3's overlay from
    mm_token_type_ids on the sliding layers (its full layers stay causal), strict: logits, batched left-padded greedy
    generation and a training step equal sdpa's."""
    inputs = _gemma4_batch(gemma4, 12, starts=[3, 5, 0], pads=[0, 2, 3])
    assert_logits_match(gemma4, **inputs)
    assert [m.window for m in zorro_masks if m.has_causal_cells] == [(3, -1)]  # the sliding layer, per-sample sizes
    assert_greedy_match(gemma4, **inputs)
    labels = inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"].bool() | (inputs["attention_mask"] == 0), -100)
    assert_gradients_match(gemma4, **inputs, labels=labels)
    assert fallback_counts() == {}


# ============================================================================================ packed by position_ids
def _text_lm(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    kw = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = LlamaConfig(**kw) if name == "llama" else MistralConfig(**kw, sliding_window=3)
    pair = _pair(AutoModelForCausalLM.from_config, cfg)
    pair.layers = 2
    return pair


@pytest.fixture(scope="module")
def llama(zt):
    return _text_lm("llama")


@pytest.fixture(scope="module")
def mistral(zt):
    return _text_lm("mistral")


def _flattened(vocab: int, lens) -> dict:
    """A batch from transformers' DataCollatorWithFlattening: the sequences in one row, position_ids restarting at 0
    for each, no attention_mask, labels -100 on each sequence's first token."""
    from transformers import DataCollatorWithFlattening

    seqs = [{"input_ids": torch.randint(1, vocab, (n,)).tolist()} for n in lens]
    return dict(DataCollatorWithFlattening()(seqs), use_cache=False)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_position_ids_packing_runs_on_zorro(request, zt, zorro_masks, strict, name):
    """Sequences packed the DataCollatorWithFlattening way (restarting position_ids, no attention_mask): transformers
    composes causal (Mistral: a sliding window of 3) with a packed-sequence AND and position remapping; the mask
    interface reads that as block-diagonal causal segments, every layer on zorro. Logits equal sdpa's (which gets the
    same mask, materialized) and each sequence run alone (flash-attention varlen semantics); gradients equal sdpa's."""
    pair = request.getfixturevalue(name)
    lens = [5, 7, 4]
    batch = _flattened(pair.cfg.vocab_size, lens)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    got = assert_logits_match(pair, **inputs)
    window = (2, -1) if name == "mistral" else None
    assert len(zorro_masks) == pair.layers
    assert all(m.q_sizes == tuple(lens) and m.causal and m.window == window for m in zorro_masks)
    w = 3 if name == "mistral" else max(lens)
    want_dense = torch.block_diag(*(torch.ones(n, n).tril() - torch.ones(n, n).tril(-w) for n in lens)).bool()
    assert torch.equal(zorro_masks[0].to_dense(), want_dense)
    with torch.no_grad():
        for i, (start, n) in enumerate(zip(torch.tensor([0, *lens]).cumsum(0).tolist(), lens)):
            alone = batch["input_ids"][:, start : start + n]
            want = pair.same(alone, use_cache=False).logits
            ref = pair.ref64(alone, use_cache=False).logits
            assert_within_policy(f"sequence {i} alone", got[:, start : start + n], want, ref, F32)
    assert_gradients_match(pair, **batch)
    assert fallback_counts() == {}


def test_position_ids_packing_per_sample_runs_as_one_mask(llama, zt, zorro_masks, strict):
    """Rows packed differently (three rows, two packings): one mask per layer whose sample_sizes hold each row's
    sequences (a zero-size third sequence pads the two-sequence row); logits and gradients equal sdpa's."""
    position_ids = _restarts([5, 7, 4], [9, 7], [5, 7, 4])
    ids = torch.randint(1, llama.cfg.vocab_size, position_ids.shape)
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    assert_logits_match(llama, **inputs)
    assert len(zorro_masks) == llama.layers
    assert zorro_masks[0].sample_sizes.tolist() == [[5, 7, 4], [9, 7, 0], [5, 7, 4]]
    labels = ids.masked_fill(position_ids == 0, -100)
    assert_gradients_match(llama, **inputs, labels=labels)
    assert fallback_counts() == {}


def test_llama_compiled_shows_zorro_ops_in_the_profiler(llama, zt, strict):
    """torch.compile(fullgraph=True) of the tiny Llama on a left-padded batch, strict: the zorro:: custom ops run in
    the forward and the backward (no graph break, no fallback), logits equal sdpa's."""
    ids = torch.randint(1, llama.cfg.vocab_size, (2, 10))
    inputs = dict(input_ids=ids, attention_mask=_left_padding([10, 7], 10), use_cache=False)
    with torch.no_grad():
        llama.zorro(**inputs)  # warm the layout cache (see the PaliGemma test)
    torch._dynamo.reset()
    compiled = torch.compile(llama.zorro, fullgraph=True, backend="aot_eager")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = compiled(**inputs).logits
        logits.sum().backward()
    llama.zorro.zero_grad(set_to_none=True)
    ops = {e.key for e in prof.key_averages()}
    assert {"zorro::attention_fwd", "zorro::attention_bwd"} <= ops, sorted(k for k in ops if "zorro" in k)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        same, ref = llama.same(**inputs).logits, llama.ref64(**inputs).logits
    assert_within_policy("compiled logits", logits.detach()[real], same[real], ref[real], F32)
    assert fallback_counts() == {}


@pytest.mark.parametrize("rows", [[[5, 7, 4], [9, 7]], [[16], [16]]], ids=["packed", "one sequence per row"])
def test_position_ids_compiled_training_runs_on_zorro(llama, zt, strict, rows):
    """torch.compile (graph breaks allowed) of a Llama training step on position_ids without an attention_mask,
    strict: transformers treats every such batch as packed there, with the boundaries as tensor values; the first
    attention call reads them at a graph break, and the zorro:: ops run forward and backward, for packed rows and for
    rows that each hold one sequence alike. Logits and parameter gradients equal sdpa's."""
    position_ids = _restarts(*rows)
    ids = torch.randint(1, llama.cfg.vocab_size, position_ids.shape)
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    labels = ids.masked_fill(position_ids == 0, -100)
    torch._dynamo.reset()
    compiled = torch.compile(llama.zorro, backend="aot_eager")
    out = []

    def step():
        out.append(compiled(**inputs, labels=labels))
        out[0].loss.backward()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = _gradients(llama.zorro, step)
    ops = {e.key for e in prof.key_averages()}
    assert {"zorro::attention_fwd", "zorro::attention_bwd"} <= ops, sorted(k for k in ops if "zorro" in k)
    with torch.no_grad():
        same, ref = llama.same(**inputs).logits, llama.ref64(**inputs).logits
    assert_within_policy("compiled logits", out[0].logits.detach(), same, ref, F32)
    assert_same_gradients(got, _gradients(llama.same, lambda: llama.same(**inputs, labels=labels).loss.backward()))
    assert fallback_counts() == {}


def test_position_ids_under_fullgraph_are_refused_naming_the_alternative(llama, zt, strict):
    """torch.compile(fullgraph=True) forbids the graph break that reads packed sequences: dynamo's error quotes our
    reason and the alternatives. The first alternative named, zorro_mask=, runs on zorro under fullgraph=True (no
    attention call reads the boundaries then) and equals sdpa."""
    lens = [5, 7, 4]
    position_ids = _restarts(lens)
    ids = torch.randint(1, llama.cfg.vocab_size, position_ids.shape)
    inputs = dict(input_ids=ids, position_ids=position_ids, use_cache=False)
    torch._dynamo.reset()
    compiled = torch.compile(llama.zorro, fullgraph=True, backend="aot_eager")
    why = r"zorro reads packed sequences from position_ids at a graph break .* pass zorro_mask=ZorroMask.packed"
    with pytest.raises(torch._dynamo.exc.Unsupported, match=why), torch.no_grad():
        compiled(**inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        got = compiled(**inputs, zorro_mask=ZorroMask.packed(lens, causal=True)).logits
        same, ref = llama.same(**inputs).logits, llama.ref64(**inputs).logits
    assert_within_policy("fullgraph with zorro_mask", got, same, ref, F32)
    assert fallback_counts() == {}


@pytest.mark.parametrize(
    "nq, held, pads",
    [(1, 5, None), (4, 0, None), (3, 7, [0, 2]), (1, 15, None), (1, 4, [0, 3])],
    ids=["decode", "prefill", "chunk-left-padded", "last-slot", "decode-left-padded"],
)
@pytest.mark.parametrize("tensor", [True, False], ids=["tensor-offset", "int-offset"])
def test_mask_interface_reads_static_caches(zt, nq, held, pads, tensor):
    """A static cache's mask (16 slots, ``held`` filled before ``nq`` queries; key j visible to query i iff j <= i +
    held, top-left aligned; the offset a tensor, as StaticCache gives it, or an int, as for its prefill): the filled
    slots as kv_lengths and a causal cell, equal to sdpa's dense mask (was a fallback: tensor offsets, keys not
    aligned at the last query)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    batch, n = 2, 16
    pad = None if pads is None else (torch.arange(held + nq)[None] >= torch.tensor(pads)[:, None])
    args = dict(batch_size=batch, q_length=nq, kv_length=n, kv_offset=0, mask_function=causal_mask_function)
    args.update(q_offset=torch.tensor(held) if tensor else held, attention_mask=pad)
    got = zt.zorro_mask_interface(**args)
    assert not isinstance(got, torch.Tensor), got._zorro_fallback_reason
    if held + nq < n:  # the empty slots are never visited (with all slots filled an int offset is plain causal)
        assert getattr(got, "mask", got).kv_lengths.tolist() == [[held + nq]] * batch
    assert torch.equal(_dense(got, batch), sdpa_mask(**args, allow_is_causal_skip=False)[:, 0])


@pytest.mark.parametrize("tensor", [True, False], ids=["tensor-offset", "int-offset"])
def test_mask_interface_reads_static_cache_windows(zt, tensor):
    """A sliding window of 4 over a static cache's 16 slots: a decoding step whose window hides filled slots as a key
    bias (no value read), a prefill the window does not cut without it, equal to sdpa's dense mask; a chunk of
    several queries the window cuts falls back, naming it."""
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask, sliding_window_overlay

    batch, n = 2, 16
    fn = and_masks(causal_mask_function, sliding_window_overlay(4))
    for nq, held, runs in [(1, 9, True), (2, 1, True), (3, 5, False)]:
        args = dict(batch_size=batch, q_length=nq, kv_length=n, kv_offset=0, mask_function=fn, attention_mask=None)
        args.update(q_offset=torch.tensor(held) if tensor else held, allow_is_causal_skip=False)
        got = zt.zorro_mask_interface(**args)
        if not runs:
            assert "window of 4 hides some of its 8 filled slots" in got._zorro_fallback_reason
            continue
        assert not isinstance(got, torch.Tensor), got._zorro_fallback_reason
        assert torch.equal(_dense(got, batch), sdpa_mask(**args)[:, 0]), (nq, held)


@pytest.mark.parametrize("name, lengths", [("llama", [7, 4]), ("mistral", [2, 1])])
def test_static_cache_generate_runs_on_zorro(request, zt, zorro_masks, strict, name, lengths):
    """Batched, left-padded greedy generate with cache_implementation="static", strict: the prefill (an int offset,
    keys past the last query) and every decoding step (a tensor offset) run on zorro, the prefill over the cache's
    filled slots (kv_lengths); tokens equal sdpa's. Mistral (a window of 3 on every layer, a sliding static cache)
    with a 2-token prompt: the prefill's cache is not yet full, its 3 slots past the prompt's 2 keys."""
    pair = request.getfixturevalue(name)
    n = max(lengths)
    ids = torch.randint(1, pair.cfg.vocab_size, (2, n))
    tokens = assert_greedy_match(
        pair, input_ids=ids, attention_mask=_left_padding(lengths, n), cache_implementation="static"
    )
    assert tokens.shape[1] == n + 6
    calls = [getattr(m, "mask", m) for m in zorro_masks[:: pair.layers]]
    assert [m.num_q for m in calls] == [n, 1, 1, 1, 1, 1]
    assert calls[0].kv_lengths.tolist() == [[n], [n]]  # the filled slots of the prefill, the others never visited
    assert fallback_counts() == {}


def test_static_cache_compiled_decoding_shows_zorro_ops_in_the_profiler(llama, zt, strict):
    """torch.compile(fullgraph=True) of a decoding step on a StaticCache, strict: its offset is a tensor, read by no
    one; the step sees the filled slots through a key bias and runs the zorro:: op. Logits equal sdpa's."""
    from transformers import StaticCache

    ids = torch.randint(1, llama.cfg.vocab_size, (2, 6))
    torch._dynamo.reset()
    logits = {}
    for name in ("zorro", "same", "ref64"):
        model = getattr(llama, name)
        cache = StaticCache(config=model.config, max_cache_len=16)
        step = torch.compile(model, fullgraph=True, backend="aot_eager") if name == "zorro" else model
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(ids[:, :5], cache=cache)
            logits[name] = step(ids[:, 5:], cache=cache).logits
        if name == "zorro":
            ops = {e.key for e in prof.key_averages()}
            assert "zorro::attention_fwd" in ops, sorted(k for k in ops if "zorro" in k)
    assert_within_policy("compiled step", logits["zorro"], logits["same"], logits["ref64"], F32)
    assert fallback_counts() == {}


@pytest.mark.full  # the graph break around a StaticCache compiles for ~6 s on a 2-core machine
def test_static_cache_compiled_prefill_reads_its_offset_at_a_graph_break(llama, zt, strict):
    """torch.compile (graph breaks allowed) of a 3-token chunk into a StaticCache holding 2, strict: each query sees
    its own key range, so the tensor offset is read at a graph break and the chunk runs the zorro:: op over the
    filled slots; logits equal sdpa's."""
    from transformers import StaticCache

    ids = torch.randint(1, llama.cfg.vocab_size, (2, 5))
    logits = {}
    torch._dynamo.reset()
    for name in ("zorro", "same", "ref64"):
        model = getattr(llama, name)
        run = torch.compile(model, backend="aot_eager") if name == "zorro" else model
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            cache = StaticCache(config=model.config, max_cache_len=16)
            model(ids[:, :2], cache=cache)  # the cache now holds 2: the next chunk's offset is a tensor
            logits[name] = run(ids[:, 2:], cache=cache).logits
        if name == "zorro":
            ops = {e.key for e in prof.key_averages()}
            assert "zorro::attention_fwd" in ops, sorted(k for k in ops if "zorro" in k)
    assert_within_policy("compiled chunk", logits["zorro"], logits["same"], logits["ref64"], F32)
    assert fallback_counts() == {}


def test_static_cache_compiled_prefill_under_fullgraph_is_refused_naming_the_alternatives(llama, zt, strict):
    """Under torch.compile(fullgraph=True) a chunk of several queries into a StaticCache would need its tensor offset
    read at a graph break: dynamo's error quotes our reason and the alternatives (compiled decoding steps need no
    break: test_static_cache_compiled_decoding_shows_zorro_ops_in_the_profiler)."""
    from transformers import StaticCache

    ids = torch.randint(1, llama.cfg.vocab_size, (2, 5))
    torch._dynamo.reset()
    full = torch.compile(llama.zorro, fullgraph=True, backend="aot_eager")
    cache = StaticCache(config=llama.zorro.config, max_cache_len=16)
    why = r"zorro reads a static cache's offset at a graph break .* compile only the decoding steps"
    with torch.no_grad():
        llama.zorro(ids[:, :2], cache=cache)
        with pytest.raises(torch._dynamo.exc.Unsupported, match=why):
            full(ids[:, 2:], cache=cache)
    assert fallback_counts() == {}


# ============================================================================================ local and chunked layers
def _pads(kind: str, batch: int, n: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """A ``(batch, n)`` 2-D padding mask: none, right, left, or holes (random tokens off, the first kept)."""
    if kind == "none":
        return None
    counts = torch.randint(0, n // 2 + 1, (batch,), generator=gen)
    idx = torch.arange(n)[None]
    if kind == "right":
        return (idx < n - counts[:, None]).long()
    if kind == "left":
        return (idx >= counts[:, None]).long()
    holes = (torch.rand(batch, n, generator=gen) < 0.3) & (idx > 0)
    return (~holes).long()


def test_mask_interface_reads_bidirectional_sliding_windows(zt):
    """transformers' bidirectional sliding window (key j visible to query i iff ``|i - j| <= W``, inclusive:
    ModernBERT's local layers) on 80 seeded random cases (W from 0 to past the sequence, self- and cross-attention
    sizes with offsets, no/right/left/hole padding): ``window=(W, W)`` shifted by the offsets, equal to the dense
    mask sdpa gets (was a fallback: an unknown overlay); a fallback only where offsets move the band off zorro's
    aligned diagonal, which no encoder does. Packed sequences (position_ids restarting) with a
    window: block-diagonal segments with that window."""
    from transformers import ModernBertConfig
    from transformers.masking_utils import (
        create_bidirectional_sliding_window_mask,
        sdpa_mask,
        sliding_window_bidirectional_mask_function,
    )

    gen = torch.Generator().manual_seed(0)
    batch = 2
    for case in range(80):
        w = int(torch.randint(0, 14, (), generator=gen))
        kv_length = int(torch.randint(1, 13, (), generator=gen))
        q_length = kv_length if case % 2 else int(torch.randint(1, kv_length + 1, (), generator=gen))
        kv_offset = 0 if case % 3 else int(torch.randint(0, 4, (), generator=gen))
        shift = int(torch.randint(-2, 3, (), generator=gen)) if case % 4 == 0 else 0
        q_offset = max(0, kv_offset + kv_length - q_length + shift) if q_length != kv_length or shift else kv_offset
        pads = _pads(["none", "right", "left", "holes"][case % 4], batch, kv_offset + kv_length, gen)
        args = dict(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset)
        args.update(mask_function=sliding_window_bidirectional_mask_function(w), attention_mask=pads)
        got = zt.zorro_mask_interface(**args)
        if abs(q_offset - kv_offset - (kv_length - q_length)) > w:  # zorro's windows hold its aligned diagonal
            assert "excludes the aligned diagonal" in got._zorro_fallback_reason
            continue
        assert not isinstance(got, torch.Tensor), (case, got._zorro_fallback_reason)
        want = sdpa_mask(**args, allow_is_causal_skip=False)
        assert torch.equal(_dense(got, batch), want[:, 0]), (case, w, q_length, kv_length, q_offset, kv_offset)
    masks = {}
    for impl in ("zorro", "sdpa"):
        cfg = ModernBertConfig(attn_implementation=impl, local_attention=4)  # sliding_window = 2
        kw = dict(config=cfg, inputs_embeds=torch.zeros(1, 16, 8), attention_mask=None)
        masks[impl] = create_bidirectional_sliding_window_mask(**kw, position_ids=_restarts([5, 7, 4]))
    assert masks["zorro"].q_sizes == (5, 7, 4) and masks["zorro"].window == (2, 2)
    assert torch.equal(_dense(masks["zorro"], 1), masks["sdpa"][:, 0])


def test_mask_interface_reads_gemma3_text_bidirectional_overlays(zt):
    """Gemma 3's text-only ``use_bidirectional_attention`` (EmbeddingGemma) ORs overlays defined in its own module
    onto transformers' masks: on its sliding layers ``|i - j| < W`` onto the causal window W (so ``|i - j| <= W -
    1``), on its full layers an always-true lambda onto causal. Recognised by their bytecode (the module's own
    functions, not transformers'), on 60 seeded cases (W from 1 to 8, no/right/left/hole padding): a bidirectional
    window ``(W - 1, W - 1)``, equal to the dense mask sdpa gets (was a fallback: an unknown OR). The exclusive
    window OR-ed to plain causal (no causal window: a one-sided band) and an unknown lambda still fall back."""
    from transformers.masking_utils import (
        causal_mask_function,
        or_masks,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    gen = torch.Generator().manual_seed(0)
    batch = 2
    for case in range(60):
        w = int(torch.randint(1, 9, (), generator=gen))
        n = int(torch.randint(1, 15, (), generator=gen))
        pads = _pads(["none", "right", "left", "holes"][case % 4], batch, n, gen)
        fn = or_masks(sliding_window_causal_mask_function(w), _bidirectional_window_overlay(w))
        args = dict(batch_size=batch, q_length=n, kv_length=n, mask_function=fn, attention_mask=pads)
        args.update(allow_is_causal_skip=False)
        got = zt.zorro_mask_interface(**args)
        assert not isinstance(got, torch.Tensor), (case, got._zorro_fallback_reason)
        assert torch.equal(_dense(got, batch), sdpa_mask(**args)[:, 0]), (case, w, n)
    for other in [
        or_masks(causal_mask_function, _bidirectional_window_overlay(3)),
        or_masks(causal_mask_function, lambda *args: torch.tensor(False, dtype=torch.bool)),
    ]:
        args = dict(batch_size=1, q_length=6, kv_length=6, mask_function=other, allow_is_causal_skip=False)
        assert "OR" in zt.zorro_mask_interface(**args)._zorro_fallback_reason


@pytest.fixture(scope="module")
def gemma3_bidirectional(zt):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=5,  # made (5 // 2) + 1 = 3 by use_bidirectional_attention: |i - j| < 3 both ways
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True,  # EmbeddingGemma's text model
        max_position_embeddings=64,
    )
    return _pair(Gemma3ForCausalLM, cfg)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_gemma3_text_bidirectional_attention_runs_on_zorro(gemma3_bidirectional, zt, zorro_masks, strict, padding):
    """Gemma 3 text with use_bidirectional_attention (a sliding window of 3 after its config halves it, so ``|i - j|
    <= 2``, and a full layer), padded, strict: both layers on zorro (``window=(2, 2)`` and plain bidirectional);
    logits and a training step's gradients equal sdpa's."""
    ids = torch.randint(1, 64, (2, 11))
    mask = _left_padding([11, 7], 11)
    mask = mask if padding == "left" else mask.flip(-1)
    assert_logits_match(gemma3_bidirectional, input_ids=ids, attention_mask=mask)
    assert [(m.causal, m.window) for m in zorro_masks] == [(False, (2, 2)), (False, None)]
    labels = ids.masked_fill(mask == 0, -100)
    assert_gradients_match(gemma3_bidirectional, input_ids=ids, attention_mask=mask, labels=labels)
    assert fallback_counts() == {}


def test_mask_interface_reads_chunked_attention(zt):
    """transformers' chunked causal mask (Llama 4: causal AND the same chunk of C positions, counted from each
    sample's first real token) on 80 seeded random cases: C from 1 to 7, a prefill without a cache, chunks of a
    prefill and decoding steps over a cache (keys from ``kv_offset``, as its sliding cache hands them), no/right/left/
    hole padding: one segment per chunk (per-sample sizes where the left paddings differ) with the row-wide causal
    rule, equal to the dense mask sdpa gets, never a fallback (was one: an unknown overlay)."""
    from transformers.masking_utils import chunked_causal_mask_function, sdpa_mask

    gen = torch.Generator().manual_seed(0)
    batch = 3
    for case in range(80):
        size = int(torch.randint(1, 8, (), generator=gen))
        kv_offset = 0 if case % 3 == 0 else int(torch.randint(0, 6, (), generator=gen))
        kv_length = int(torch.randint(1, 15, (), generator=gen))
        q_length = int(torch.randint(1, kv_length + 1, (), generator=gen))  # a chunk of a prefill over a cache
        q_length = kv_length if case % 3 == 0 else 1 if case % 2 else q_length  # a prefill, a decoding step
        pads = _pads(["none", "right", "left", "holes", "left"][case % 5], batch, kv_offset + kv_length, gen)
        left = torch.zeros(batch, dtype=torch.long) if pads is None else (pads.cumsum(-1) == 0).sum(-1)
        args = dict(batch_size=batch, q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, attention_mask=pads)
        args.update(q_offset=kv_offset + kv_length - q_length, mask_function=chunked_causal_mask_function(size, left))
        got = zt.zorro_mask_interface(**args)
        assert not isinstance(got, torch.Tensor), (case, got._zorro_fallback_reason)
        want = sdpa_mask(**args, allow_is_causal_skip=False)
        assert torch.equal(_dense(got, batch), want[:, 0]), (case, size, q_length, kv_length, kv_offset, left)


@pytest.mark.parametrize(
    "lens", [[[5, 7, 4]], [[5, 7, 4], [5, 7, 4]], [[3, 13], [16], [9, 7]]], ids=["packed", "batch", "per-sample"]
)
def test_mask_interface_reads_chunked_attention_over_packed_sequences(zt, lens):
    """Llama 4's chunked mask over sequences packed by restarting position_ids (chunks of 4 on the positions
    remapped per sequence, so each sequence is cut from its own start) as built by transformers'
    create_chunked_causal_mask: block-diagonal causal segments, one per chunk of each sequence (per-sample sizes
    where rows differ), equal to the dense mask sdpa gets (was a fallback)."""
    from transformers import Llama4TextConfig
    from transformers.masking_utils import create_chunked_causal_mask

    position_ids = _restarts(*lens)
    batch, n = position_ids.shape
    masks = {}
    for impl in ("zorro", "sdpa"):
        cfg = Llama4TextConfig(attn_implementation=impl, attention_chunk_size=4)
        kw = dict(config=cfg, inputs_embeds=torch.zeros(batch, n, 8), attention_mask=None, cache=None)
        masks[impl] = create_chunked_causal_mask(**kw, position_ids=position_ids, allow_is_causal_skip=False)
    got = masks["zorro"]
    assert isinstance(got, ZorroMask), getattr(got, "_zorro_fallback_reason", type(got))
    assert got.causal and (got.sample_sizes is not None) == (len(set(map(tuple, lens))) > 1)
    assert torch.equal(_dense(got, batch), masks["sdpa"][:, 0])


@pytest.fixture(scope="module")
def modernbert(zt):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    cfg = ModernBertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        global_attn_every_n_layers=3,  # layer 0 global, layers 1 and 2 local
        local_attention=4,  # a bidirectional window of 2 each side
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    return _pair(ModernBertForMaskedLM, cfg)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_modernbert_local_layers_run_on_zorro(modernbert, zt, zorro_masks, strict, padding):
    """ModernBERT (a global layer, two local layers of a bidirectional window of 2 each side), padded, strict: every
    layer on zorro (the local ones with ``window=(2, 2)``); logits and a training step's gradients equal sdpa's."""
    ids = torch.randint(3, 64, (2, 12))
    lengths = [12, 8]
    mask = _left_padding(lengths, 12) if padding == "left" else _left_padding(lengths, 12).flip(-1)
    inputs = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)
    assert_logits_match(modernbert, **inputs)
    assert [getattr(m, "window", None) for m in zorro_masks] == [None, (2, 2), (2, 2)]
    assert_gradients_match(modernbert, **inputs, labels=ids.masked_fill(mask == 0, -100))
    assert fallback_counts() == {}


@pytest.fixture(scope="module")
def llama4(zt):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attention_chunk_size=4,
        no_rope_layer_interval=2,  # layer 0 chunked (with RoPE), layer 1 full (without)
        num_local_experts=2,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        max_position_embeddings=64,
    )
    pair = _pair(Llama4ForCausalLM, cfg)
    assert pair.same.config.layer_types == ["chunked_attention", "full_attention"]
    return pair


def test_llama4_chunked_layers_run_on_zorro(llama4, zt, zorro_masks, strict):
    """Llama 4 text (chunks of 4 on its chunked layer), batched and left padded, strict: the prefill (one segment per
    chunk, counted from each sample's first real token), a prefill in two chunks over a DynamicCache, and greedy
    decoding over its sliding cache (the last 3 keys and the query, cut into chunks; dynamic, and static: its
    chunked layers' static sliding cache hands over int offsets) all run on zorro; logits, tokens and a training
    step's gradients equal sdpa's."""
    from transformers import DynamicCache

    ids = torch.randint(1, 64, (2, 11))
    mask = _left_padding([11, 8], 11)
    assert_logits_match(llama4, input_ids=ids, attention_mask=mask)
    chunked = zorro_masks[0]  # sample 1's 3 padded tokens (hidden by a key bias) before its chunks
    assert chunked.causal and chunked.sample_sizes.tolist() == [[4, 4, 3], [3, 4, 4]]
    got = {}
    for name in ("zorro", "same", "ref64"):
        cache = DynamicCache(config=llama4.cfg)
        with torch.no_grad():
            getattr(llama4, name)(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
            got[name] = getattr(llama4, name)(ids[:, 6:], attention_mask=mask, cache=cache).logits
    real = mask[:, 6:].bool()
    assert_within_policy("second chunk", got["zorro"][real], got["same"][real], got["ref64"][real], F32)
    assert_greedy_match(llama4, input_ids=ids, attention_mask=mask)
    assert_greedy_match(llama4, input_ids=ids, attention_mask=mask, cache_implementation="static")
    labels = ids.masked_fill(mask == 0, -100)
    assert_gradients_match(llama4, input_ids=ids, attention_mask=mask, labels=labels)
    assert fallback_counts() == {}


def test_llama4_packed_sequences_run_on_zorro(llama4, zt, zorro_masks, strict):
    """Llama 4 text on a DataCollatorWithFlattening batch (sequences of 5, 7 and 4 in one row), strict: its chunked
    layer as causal segments, one per chunk of 4 of each sequence, its full layer per sequence; logits equal sdpa's
    and each sequence run alone, gradients equal sdpa's."""
    lens = [5, 7, 4]
    batch = _flattened(llama4.cfg.vocab_size, lens)
    got = assert_logits_match(llama4, **{k: v for k, v in batch.items() if k != "labels"})
    assert [m.q_sizes for m in zorro_masks] == [(4, 1, 4, 3, 4), (5, 7, 4)]
    with torch.no_grad():
        for start, n in zip(torch.tensor([0, *lens]).cumsum(0).tolist(), lens):
            alone = batch["input_ids"][:, start : start + n]
            want, ref = llama4.same(alone, use_cache=False).logits, llama4.ref64(alone, use_cache=False).logits
            assert_within_policy(f"sequence at {start} alone", got[:, start : start + n], want, ref, F32)
    assert_gradients_match(llama4, **batch)
    assert fallback_counts() == {}


@pytest.mark.full  # compiling the tiny Llama 4 twice: ~20 s on the 2-core machine
def test_llama4_chunked_layers_compiled_read_their_chunks_at_a_graph_break(llama4, zt, strict):
    """torch.compile (graph breaks allowed) of Llama 4 text on a left-padded batch, strict: the chunks start after
    each sample's left padding, a tensor value, read at one graph break; the zorro:: op runs and the logits equal
    sdpa's. fullgraph=True forbids that break: dynamo's error quotes our reason and the alternatives."""
    ids = torch.randint(1, 64, (2, 11))
    inputs = dict(input_ids=ids, attention_mask=_left_padding([11, 8], 11), use_cache=False)
    torch._dynamo.reset()
    compiled = torch.compile(llama4.zorro, backend="aot_eager")
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(**inputs).logits
    ops = {e.key for e in prof.key_averages()}
    assert "zorro::attention_fwd" in ops, sorted(k for k in ops if "zorro" in k)
    with torch.no_grad():
        same, ref = llama4.same(**inputs).logits, llama4.ref64(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert_within_policy("compiled logits", got[real], same[real], ref[real], F32)
    torch._dynamo.reset()
    full = torch.compile(llama4.zorro, fullgraph=True, backend="aot_eager")
    why = r"zorro reads chunked attention's chunks \(Llama 4\) at a graph break .* pass zorro_mask="
    with pytest.raises(torch._dynamo.exc.Unsupported, match=why), torch.no_grad():
        full(**inputs)
    torch._dynamo.reset()
    assert fallback_counts() == {}


# ============================================================================================ refused
def test_git_is_refused_at_set_attn_implementation(zt):
    """GIT's text layers are hard-wired to an eager attention class that added our boolean fallback mask to the scores
    as +1/0 (causality lost, no fallback recorded). Like "sdpa", "zorro" is now refused, naming the model, both when
    set and when loading; the model keeps its implementation."""
    from transformers import GitConfig, GitForCausalLM

    cfg = GitConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = GitForCausalLM(cfg)
    why = r'"zorro" is not supported by GitForCausalLM: some of its attention layers do not call'
    with pytest.raises(ValueError, match=why):
        model.set_attn_implementation("zorro")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=why):
        GitForCausalLM._from_config(cfg, attn_implementation="zorro")


# ============================================================================================ docs
def test_docs_integrations_hugging_face_example_runs(zt, zorro_masks):
    """docs/integrations.md's Hugging Face example runs as written (its python blocks in order, one namespace) on zorro,
    strict, and leaves the integration non-strict."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    section = text[text.index("## Hugging Face transformers") :]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert blocks
    try:
        namespace: dict = {}
        for code in blocks:
            exec(compile(code, "docs/integrations.md", "exec"), namespace)
    finally:
        zt.register()
    assert any(getattr(m, "mask", m).has_causal_cells for m in zorro_masks) and fallback_counts() == {}


def test_a_renamed_closure_variable_is_a_fallback_reason_not_a_crash(monkeypatch):
    """The mask interface reads transformers' mask functions' closures; a release that renames a closure variable must
    give a fallback reason naming it (counted, FallbackError under strict), not a KeyError from inside the model."""
    from transformers.masking_utils import and_masks, causal_mask_function

    from zorro_kernels.integrations import _hf_reading

    def overlay(width):
        def inner(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx > q_idx - width

        return inner

    renamed = overlay(3)
    monkeypatch.setattr(_hf_reading, "_SLIDING_OVERLAY_CODE", renamed.__code__)
    reading, why = _hf_reading._read(and_masks(causal_mask_function, renamed))
    assert reading is None and "no closure variable 'sliding_window'" in why
