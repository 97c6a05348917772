"""backend="auto": the measured choice (timings mocked; CPU only), its cache key, the static rules, explain(), and the
dense path for tiny problems with its NaN isolation."""

import warnings

import pytest
import torch

import zorro_kernels.auto as auto
from zorro_kernels import ZorroMask, explain, zorro_attention
from zorro_kernels.attention import select_backend
from zorro_kernels.backends import BACKENDS
from zorro_kernels.testing import generate_qkv


@pytest.fixture
def timed(monkeypatch):
    """CPU inputs take the measured (CUDA) path among 'segments' and 'dense'; ``times`` sets what each takes."""
    calls = []
    times = {"segments": 2.0, "dense": 1.0}

    def fake_time(name, q, k, v, mask, scale, grad, bias=None):
        calls.append((name, grad))
        return times[name]

    monkeypatch.setattr(auto, "_measures", lambda device: True)
    monkeypatch.setattr(auto, "_time", fake_time)
    monkeypatch.setattr(auto, "PRIORITY", {"cpu": ("segments", "dense")})
    monkeypatch.setattr(auto, "_benchmark", True)
    monkeypatch.setattr(auto, "_measured", {})
    return calls, times


@pytest.fixture
def without_kernel(monkeypatch):
    """The CPU rule as fitted between dense and segments: the compiled interval kernel switched off
    (ZORRO_CPU_KERNEL=0), as where it does not build; its own picks: test_cpu_rule_with_the_interval_kernel."""
    monkeypatch.setenv("ZORRO_CPU_KERNEL", "0")


def test_measured_choice_is_the_fastest_and_timed_once_per_key(timed):
    calls, times = timed
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    assert select_backend(q, k, v, mask) == "dense"
    assert calls == [("segments", False), ("dense", False)]
    times["dense"] = 3.0  # cached: not timed again, same answer
    assert select_backend(q, k, v, mask) == "dense" and len(calls) == 2
    # a mask with the same content is the same problem
    twin = ZorroMask.from_segments([("x", 6), ("y", 10), ("f", 2)], {"x": ["x"], "y": ["y"], "f": "*"})
    assert select_backend(q, k, v, twin) == "dense" and len(calls) == 2
    e = explain(q, k, v, mask)
    assert e.chosen == "dense" and e.how == "measured" and e.times_ms == {"segments": 2.0, "dense": 1.0}


@pytest.mark.parametrize("change", ["batch", "heads", "kv_heads", "head_dim", "dtype", "grad", "lengths"])
def test_cache_key_separates_what_changes_speed(timed, change):
    calls, _ = timed
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    select_backend(q, k, v, mask)
    n = len(calls)
    if change == "batch":
        q, k, v = generate_qkv(mask, batch=3, heads=2, kv_heads=1, head_dim=16)
    elif change == "heads":
        q, k, v = generate_qkv(mask, kv_heads=1, head_dim=16)
    elif change == "kv_heads":
        q, k, v = generate_qkv(mask, heads=2, head_dim=16)
    elif change == "head_dim":
        q, k, v = generate_qkv(mask, heads=2, kv_heads=1)
    elif change == "dtype":
        q, k, v = (t.half() for t in (q, k, v))
    elif change == "grad":
        q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16, requires_grad=True)
    elif change == "lengths":
        mask = mask.with_lengths(torch.tensor([[6, 10, 2], [3, 10, 2]]))
    select_backend(q, k, v, mask)
    assert len(calls) == n + 2, calls
    assert calls[-1][1] == (change == "grad")


def test_never_times_while_compiling_or_capturing(timed, monkeypatch):
    calls, _ = timed
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    monkeypatch.setattr(auto, "_capturing", lambda device: True)
    e = explain(q, k, v, mask)
    assert calls == [] and e.how == "rule" and "CUDA graph capture" in e.note
    monkeypatch.setattr(auto, "_capturing", lambda device: False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    e = auto._choose(q, k, v, mask, 0.25, False)
    assert calls == [] and e.how == "rule" and "torch.compile" in e.note


def test_compiled_call_never_times(timed):
    calls, _ = timed
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    torch._dynamo.reset()
    out = torch.compile(lambda a, b, c: zorro_attention(a, b, c, mask), fullgraph=True, backend="aot_eager")(q, k, v)
    assert calls == []
    torch.testing.assert_close(out, zorro_attention(q, k, v, mask, backend="reference"), rtol=1e-5, atol=1e-6)


def test_opt_out_uses_the_static_rule(timed, monkeypatch):
    calls, _ = timed
    auto.set_benchmark(False)
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    e = explain(q, k, v, mask)
    assert calls == [] and e.how == "rule" and "ZORRO_AUTO_BENCHMARK=0" in e.note
    assert e.chosen == auto.static_choice(q, k, mask, False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        auto.set_benchmark("no")
    monkeypatch.setattr(auto, "_benchmark", None)
    monkeypatch.setenv("ZORRO_AUTO_BENCHMARK", "0")
    assert not auto._benchmark_enabled()


def _cuda_like(n, grad):
    q = torch.empty(1, 1, n, 16, device="meta")
    return q, q


def test_static_cuda_rule_follows_the_h200_measurements():
    q, k = _cuda_like(1896, True)
    assert auto._cuda_rule(q, k, grad=False) == "segments"  # forward: segments faster at both sizes
    assert auto._cuda_rule(q, k, grad=True) == "triton"  # fwd+bwd at Figure-2 size: triton 1.04 vs 1.66 ms
    q, k = _cuda_like(16384, True)
    assert auto._cuda_rule(q, k, grad=True) == "segments"  # fwd+bwd at 16k: segments 5.34 vs 6.98 ms


def test_cpu_rule_dense_for_tiny_problems_segments_beyond(without_kernel):
    tiny = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = (torch.randn(8, 2, 14, 16) for _ in range(3))
    assert select_backend(q, k, v, tiny) == "dense"
    big = ZorroMask.zorro(audio=64, video=196, fusion=4)
    q, k, v = (torch.randn(2, 4, 264, 32) for _ in range(3))
    # forward: the segment path 0.68 against 0.85 ms; forward+backward, whose segment-path overheads count twice:
    # dense 2.95 against 3.30 ms (benchmarks/cpu_auto_rule.py's timing, 1 thread, 2026-12-07)
    assert select_backend(q, k, v, big, grad=False) == "segments"
    assert select_backend(q, k, v, big, grad=True) == "dense"
    # a sliding window: the segment path's steps across the window's edges are masked products, not flash calls;
    # dense 0.31 against 1.64 ms forward, 1.03 against 5.10 forward+backward (issue 21, 2026-12-07), with or without
    # per-sample lengths (which make more calls still)
    lengths = torch.tensor([[40 - i, 80 - 2 * i, 4] for i in range(8)])
    rules = {"audio": ["audio"], "video": ["video"], "fusion": "*"}
    windowed = ZorroMask.from_segments([("audio", 40), ("video", 80), ("fusion", 4)], rules, window=(48, 48))
    q, k, v = (torch.randn(8, 2, 124, 16) for _ in range(3))
    assert select_backend(q, k, v, windowed.with_lengths(lengths)) == "dense"
    assert select_backend(q, k, v, windowed) == "dense"
    # a ragged batch whose patterns share buckets makes as many calls as the batch without lengths (issue 21): the
    # same choice; at 124 tokens dense (0.38 against 0.44 ms forward, 1.29 against 1.59 forward+backward, ragged)
    ragged = ZorroMask.zorro(audio=40, video=80, fusion=4, lengths=lengths)
    assert auto._plan_costs(ragged)[0] == auto._plan_costs(ragged.with_lengths(None))[0]
    assert select_backend(q, k, v, ragged) == select_backend(q, k, v, ragged.with_lengths(None)) == "dense"
    # the same layout four times larger: segments
    q, k, v = (torch.randn(8, 2, 496, 16) for _ in range(3))
    ragged = ZorroMask.zorro(audio=160, video=320, fusion=16, lengths=lengths * 4)
    assert select_backend(q, k, v, ragged) == select_backend(q, k, v, ragged.with_lengths(None)) == "segments"


def test_cpu_rule_counts_no_forward_copies_for_steps_read_as_views(without_kernel):
    """The bug: the rule charged the forward for copying every step's query and key rows, but a one-range step reads
    them as views of the inputs (only its output rows are copied). At the demo's size, a batch of 256 without
    lengths, the forward went to dense at 32.4 ms against the segment path's 21.8 (1 thread, 2026-12-07); the
    forward+backward, whose copies are real, stays dense (94.6 against 106.7 ms)."""
    mask = ZorroMask.zorro(audio=32, video=64, fusion=4)
    q, k, v = (torch.empty(256, 4, 100, 32) for _ in range(3))
    assert select_backend(q, k, v, mask, grad=False) == "segments"
    assert select_backend(q, k, v, mask, grad=True) == "dense"


def test_cpu_rule_with_the_interval_kernel():
    """Where the kernel builds, the rule weighs it against the dense/segments pick (benchmarks/cpu_auto_rule.py
    --sweep and benchmarks/cpu_costs.py, 1 thread, load 4-5, 2026-12-07; BENCHMARKS.md)."""
    if BACKENDS["intervals"].not_supported_reasons(*(torch.zeros(1, 1, 1, 8),) * 3, ZorroMask.packed([1])):
        pytest.skip("the compiled CPU kernel is not available here")
    # tiny: dense (14 tokens, Zorro: 0.030 against the kernel's 0.038 ms forward, 0.19 against 0.23 f+b)
    tiny = ZorroMask.zorro(audio=2, video=10, fusion=2)
    q = torch.empty(1, 4, 14, 64)
    assert select_backend(q, q, q, tiny) == "dense"
    # a sliding window at 292 tokens: the kernel (0.73 ms against dense 1.24 and segments 4.76 forward)
    window = ZorroMask.from_segments([("x", 292)], {"x": "*"}, window=(36, 36))
    q = torch.empty(1, 4, 292, 64)
    assert select_backend(q, q, q, window) == "intervals"
    # a large unmasked forward: the segment path's one plain flash call (N=2052: 69.7 against 74.3 ms); its
    # forward+backward: the kernel (271.5 against 303.4 ms)
    full = ZorroMask.full(audio=342, video=1708, fusion=2)
    q = torch.empty(1, 4, 2052, 64)
    assert select_backend(q, q, q, full, grad=False) == "segments"
    assert select_backend(q, q, q, full, grad=True) == "intervals"
    # issue 20's Gemma-3 row: the kernel (0.90 of ideal forward against the segment path's 0.78)
    text = [[100, 300, 200, 150, 274], [20, 500, 64, 400, 40]]
    sizes = torch.tensor([[x for i in range(5) for x in ([t[i], 256] if i < 4 else [t[i]])] for t in text])
    names = [n for i in range(5) for n in ([f"t{i}", f"img{i}"] if i < 4 else [f"t{i}"])]
    gemma = ZorroMask.causal_with_blocks(list(zip(names, sizes[0].tolist())), ["img*"], sample_sizes=sizes)
    q = torch.empty(2, 8, 2048, 64)
    assert select_backend(q, q, q, gemma, grad=False) == select_backend(q, q, q, gemma, grad=True) == "intervals"


def test_cpu_rule_picks_the_kernel_without_a_segment_plan_where_nothing_can_beat_it(monkeypatch):
    """Where the kernel's cost is under the least the others can cost, the rule picks it from the attended pairs its
    intervals count, without building the segment plan (issue 20: a fresh Gemma-3 mask under 1 ms of construction);
    elsewhere, and wherever it answers at all, the pick is the full rule's."""
    if BACKENDS["intervals"].not_supported_reasons(*(torch.zeros(1, 1, 1, 8),) * 3, ZorroMask.packed([1])):
        pytest.skip("the compiled CPU kernel is not available here")
    from zorro_kernels.backends.segments import build_plan

    text = [[100, 300, 200, 150, 274], [20, 500, 64, 400, 40]]
    sizes = torch.tensor([[x for i in range(5) for x in ([t[i], 256] if i < 4 else [t[i]])] for t in text])
    names = [n for i in range(5) for n in ([f"t{i}", f"img{i}"] if i < 4 else [f"t{i}"])]
    gemma = ZorroMask.causal_with_blocks(list(zip(names, sizes[0].tolist())), ["img*"], sample_sizes=sizes)
    q = torch.empty(2, 8, 2048, 64)
    candidates = ("dense", "segments", "intervals")
    assert auto._cpu_rule(q, q, gemma, grad=True, candidates=candidates) == "intervals"
    assert not any(key[0] is build_plan for key in gemma._cache), "the segment plan was built"

    def full_rule(qq, mask, grad):
        with monkeypatch.context() as m:
            m.setattr(auto, "_interval_mean_attended", lambda mask: None)
            return auto._cpu_rule(qq, qq, mask, grad=grad, candidates=candidates)

    layouts = [
        ZorroMask.zorro(audio=2, video=10, fusion=2),
        ZorroMask.zorro(audio=40, video=80, fusion=4),
        ZorroMask.full(audio=342, video=1708, fusion=2),
        ZorroMask.packed([30, 50, 70, 142]),
        ZorroMask.from_segments([("x", 292)], {"x": "*"}, window=(36, 36)),
        ZorroMask.from_segments([("x", 600)], {"x": "*"}, causal=True),
    ]
    for mask in layouts:
        for b, h, d in ((1, 4, 64), (8, 2, 16), (256, 4, 32)):
            qq = torch.empty(b, h, mask.num_q, d)
            for grad in (False, True):
                assert auto._cpu_rule(qq, qq, mask, grad=grad, candidates=candidates) == full_rule(qq, mask, grad), (
                    mask,
                    b,
                    h,
                    d,
                    grad,
                )


def test_explain_lists_every_candidate_and_its_reasons(without_kernel):
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = (torch.randn(1, 2, 14, 16) for _ in range(3))
    e = explain(q, k, v, mask)
    assert e.chosen == "dense" and e.how == "rule" and set(e.reasons) == {"dense", "intervals", "segments"}
    assert str(e).splitlines() == [
        "zorro_attention backend: dense (rule)",
        "  dense: takes it",
        "  intervals: refuses: the CPU kernel is disabled (ZORRO_CPU_KERNEL=0)",
        "  segments: takes it",
    ]
    e = explain(q.double(), k.double(), v.double(), mask, backend="triton")
    assert e.how == "forced, but it refuses" and any("float64" in r for r in e.reasons["triton"])
    with pytest.raises(ValueError, match="unknown backend"):
        explain(q, k, v, mask, backend="magic")
    with pytest.raises(ValueError, match="q has Nq=14 tokens"):
        explain(q, k, v, ZorroMask.zorro(audio=4, video=9, fusion=2))


def test_no_candidate_lists_every_refusal(monkeypatch):
    monkeypatch.setattr(auto, "PRIORITY", {"cpu": ("triton", "nonexistent")})
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = (torch.randn(1, 2, 14, 16, dtype=torch.float64) for _ in range(3))
    with pytest.raises(
        ValueError, match="(?s)no zorro_attention backend.*triton: .*float64.*nonexistent: not available"
    ):
        zorro_attention(q, k, v, mask)


# ------------------------------------------------------------------------------------------------ dense path
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_dense_never_reads_masked_keys(poison):
    """NaN/Inf in the video keys and values must not reach audio rows (forward) nor the audio keys' gradients
    (no fusion rows: they may attend video, so through them the poison reaches every gradient legitimately)."""
    mask = ZorroMask.zorro(audio=5, video=6)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5:11] = poison
    v2[:, :, 5:11] = poison
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    dirty = [t.clone().requires_grad_() for t in (q, k2, v2)]
    outs = [zorro_attention(*ts, mask, backend="dense") for ts in (clean, dirty)]
    g = torch.randn_like(outs[0])
    g[:, :, 5:] = 0  # only the audio rows' gradient flows
    for o in outs:
        o.backward(g)
    torch.testing.assert_close(outs[1][:, :, :5], outs[0][:, :, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(dirty[0].grad[:, :, :5], clean[0].grad[:, :, :5], rtol=0, atol=1e-6)
    for a, b in ((dirty[1], clean[1]), (dirty[2], clean[2])):
        torch.testing.assert_close(a.grad[:, :, :5], b.grad[:, :, :5], rtol=0, atol=1e-6)


def test_dense_is_registered_for_cpu_only():
    assert BACKENDS["dense"].supported_devices() == ("cpu",)


class _FakeEvent:
    """torch.cuda.Event stand-in (CPU clock) so the timing code runs without a GPU."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.mark.parametrize("grad", [False, True])
def test_timing_runs_each_candidate_without_touching_inputs_or_rng(monkeypatch, grad):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, heads=2, kv_heads=1, head_dim=16, requires_grad=grad)
    state = torch.get_rng_state()
    for name in ("segments", "dense"):
        assert auto._time(name, q, k, v, mask, 0.25, grad) > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(t.grad is None for t in (q, k, v))


# ------------------------------------------------------------------------------------------------ failing candidates
def _failing(monkeypatch, name: str, message: str = "ptxas fatal: out of registers\ndetails") -> list:
    """Backend ``name``'s forward (and eager path) raise ``message``; returns the list of calls that raised."""
    import dataclasses

    raised = []

    def boom(*args, **kwargs):
        raised.append(name)
        raise RuntimeError(message)

    monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], forward=boom, eager=boom))
    return raised


@pytest.fixture
def measured_cpu(monkeypatch):
    """CPU inputs take the measured (CUDA) path with the real timing code, candidates 'dense' then 'segments'."""
    monkeypatch.setattr(auto, "_measures", lambda device: True)
    monkeypatch.setattr(auto, "PRIORITY", {"cpu": ("dense", "segments")})
    monkeypatch.setattr(auto, "_benchmark", True)
    monkeypatch.setattr(auto, "_measured", {})
    monkeypatch.setattr(auto, "_failed", {})


@pytest.mark.parametrize("grad", [False, True])
def test_a_candidate_failing_while_timed_is_dropped_with_one_warning(measured_cpu, monkeypatch, grad):
    raised = _failing(monkeypatch, "dense")
    mask = ZorroMask.zorro(audio=6, video=10, fusion=2)
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=1, head_dim=16, requires_grad=grad)
    with pytest.warns(
        RuntimeWarning, match=r"dense failed while auto timed it \(RuntimeError: ptxas fatal: out of reg"
    ) as w:
        out = zorro_attention(q, k, v, mask)
    assert [x.filename for x in w] == [__file__]  # one warning, naming the caller's line
    torch.testing.assert_close(out, zorro_attention(q, k, v, mask, backend="segments"), rtol=0, atol=0)
    assert raised == ["dense"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no re-timing, no second attempt
        for _ in range(2):
            zorro_attention(q, k, v, mask)
        e = explain(q, k, v, mask)
    assert (
        raised == ["dense"]
        and e.chosen == "segments"
        and e.failed == {"dense": "RuntimeError: ptxas fatal: out of registers"}
    )
    assert "  dense: dropped for this problem: it failed (RuntimeError: ptxas fatal: out of registers)" in str(e)
    # another problem key times both again
    q2, k2, v2 = generate_qkv(mask, batch=3, heads=2, kv_heads=1, head_dim=16, requires_grad=grad)
    with pytest.warns(RuntimeWarning, match="dense failed"):
        zorro_attention(q2, k2, v2, mask)
    assert auto._failed and auto._measured
    auto.clear_cache()  # forgets the drops: the next call times (and warns) again
    assert auto._failed == {} and auto._measured == {}


def test_a_candidate_failing_when_run_is_dropped_and_the_next_runs(monkeypatch, without_kernel):
    """Not timed (the CPU rule picks dense for a tiny problem): the failure comes when auto runs it."""
    monkeypatch.setattr(auto, "_failed", {})
    raised = _failing(monkeypatch, "dense", "launch failed")
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = (torch.randn(1, 2, 14, 16) for _ in range(3))
    assert auto._choose(q, k, v, mask, 0.25, False).chosen == "dense"
    with pytest.warns(RuntimeWarning, match=r"dense failed when auto ran it \(RuntimeError: launch failed\)"):
        out = zorro_attention(q, k, v, mask)
    torch.testing.assert_close(out, zorro_attention(q, k, v, mask, backend="segments"), rtol=0, atol=0)
    zorro_attention(q, k, v, mask)
    assert raised == ["dense"]
    e = explain(q, k, v, mask)
    assert e.chosen == "segments" and e.how == "only candidate" and "dense" in e.failed
    # forced, the failing backend still raises; the last candidate's own error is raised as it is
    with pytest.raises(RuntimeError, match="launch failed"):
        zorro_attention(q, k, v, mask, backend="dense")
    _failing(monkeypatch, "segments", "segments broke")
    with pytest.raises(RuntimeError, match="segments broke"):
        zorro_attention(q, k, v, mask)


@pytest.mark.skipif(
    not BACKENDS["triton"].supported_devices() or "cpu" not in BACKENDS["triton"].supported_devices(),
    reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_triton_kernel_failure_never_reaches_an_auto_caller(measured_cpu, monkeypatch, where):
    """The real Triton backend in the interpreter, its kernel launch made to fail: auto warns once and runs the segment
    path; ``backend="triton"`` raises KernelFailure in our words, naming the shapes and the error's first line."""
    from zorro_kernels.backends.triton import _bwd, _fwd
    from zorro_kernels.backends.triton.backend import KernelFailure

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal instruction was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(*((_fwd, "attention_forward") if where == "forward" else (_bwd, "attention_backward")), boom)
    monkeypatch.setattr(auto, "PRIORITY", {"cpu": ("triton", "segments")})
    mask = ZorroMask.zorro(audio=4, video=8, fusion=2)
    q, k, v = generate_qkv(mask, batch=1, heads=2, kv_heads=1, head_dim=16, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=rf"triton failed while auto timed it \(KernelFailure: the Triton {where}"):
        out = zorro_attention(q, k, v, mask)
    out.sum().backward()
    assert explain(q, k, v, mask).chosen == "segments"
    msg = (
        rf"the Triton {where} failed to compile or launch \(B=1, H=2, Nq=14, D=16, float32\): "
        r"RuntimeError: CUDA error: an illegal instruction was encountered$"
    )
    with pytest.raises(KernelFailure, match=msg):
        zorro_attention(q, k, v, mask, backend="triton").sum().backward()
