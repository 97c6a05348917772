"""Property-based fuzzing (hypothesis) of every CPU backend against the fp64 oracle, with poison.

Each example draws a layout (segments of odd sizes including 0 and 1, random rules with some cells causal, per-sample
lengths on either side, cross-attention, causal, a sliding window), GQA head counts, a head dim and a dtype, then checks

1. forward and every gradient against the fp64 oracle under the tolerance policy (``zorro_kernels.testing``), and
2. NaN isolation: NaN/Inf poured into everything a random set of rows may not attend (keys, other rows' q and upstream
   gradients) leaves those rows' outputs, their dq and the dk/dv of keys only clean rows read bit-for-bit unchanged
   (``tests/isolation.py``).

Default tier: a small derandomized slice (seconds). ``-m full``: 10,000 layouts (5,000 per CPU backend, a fifth of
that for the dense and intervals backends; ``ZORRO_FUZZ_EXAMPLES`` sets the count per backend), and a slice of the
Triton backend in its CPU interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from zorro_kernels import ZorroMask, zorro_attention  # noqa: E402
from zorro_kernels.backends import BACKENDS  # noqa: E402
from zorro_kernels.testing import check_against_oracle  # noqa: E402

from .isolation import check_isolation, poison_everything_unseen  # noqa: E402

SIZES = st.sampled_from([0, 1, 2, 3, 5, 8, 13, 17])


@st.composite
def layouts(draw, max_segments: int = 4) -> ZorroMask:
    n_q = draw(st.integers(1, max_segments))
    q_sizes = draw(st.lists(SIZES, min_size=n_q, max_size=n_q).filter(lambda s: sum(s) > 0))
    cross = draw(st.booleans())
    if cross:
        n_k = draw(st.integers(1, max_segments))
        kv_sizes = draw(st.lists(SIZES, min_size=n_k, max_size=n_k).filter(lambda s: sum(s) > 0))
    else:
        kv_sizes = q_sizes
    allow = torch.tensor(
        draw(
            st.lists(
                st.lists(st.booleans(), min_size=len(kv_sizes), max_size=len(kv_sizes)), min_size=n_q, max_size=n_q
            )
        ),
        dtype=torch.bool,
    )
    b = draw(st.integers(1, 3))

    def lengths(sizes):
        return torch.tensor([[draw(st.integers(0, s)) for s in sizes] for _ in range(b)])

    q_len = lengths(q_sizes) if draw(st.booleans()) else None
    kv_len = lengths(kv_sizes) if cross and draw(st.booleans()) else None
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.integers(-1, 6), st.integers(-1, 6))))
    names = [f"s{i}" for i in range(n_q)]
    kv = [(f"k{i}", s) for i, s in enumerate(kv_sizes)] if cross else None
    cells = None
    if draw(st.booleans()):  # rule cells: some allowed cells causal, bottom-right per pair (issue 20)
        marks = draw(
            st.lists(
                st.lists(st.booleans(), min_size=len(kv_sizes), max_size=len(kv_sizes)), min_size=n_q, max_size=n_q
            )
        )
        cells = allow & torch.tensor(marks, dtype=torch.bool)
    return ZorroMask(
        list(zip(names, q_sizes)),
        allow,
        kv_segments=kv,
        lengths=q_len,
        kv_lengths=kv_len,
        causal=causal,
        window=window,
        causal_cells=cells,
    )


@st.composite
def problems(draw, dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16)):
    mask = draw(layouts())
    hkv, g = draw(st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 2)]))
    d = draw(st.sampled_from([4, 8, 16]))
    dtype = draw(st.sampled_from(dtypes))
    b = mask.batch_size or draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, mask.num_q, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, hkv, mask.num_kv, d, generator=gen).to(dtype) for _ in range(2))
    rows = torch.rand(b, mask.num_q, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return mask, q, k, v, rows


def _attn(backend):
    return lambda q, k, v, mask, scale=None: zorro_attention(q, k, v, mask, scale=scale, backend=backend)


def _check(backend, problem):
    mask, q, k, v, rows = problem
    check_against_oracle(_attn(backend), q, k, v, mask)
    check_isolation(_attn(backend), q, k, v, mask, *poison_everything_unseen(mask, q.shape[0], rows))


_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.parametrize("backend", ["segments", "reference"])
@settings(max_examples=8, derandomize=True, **_COMMON)
@given(problem=problems())
def test_fuzz_fast(backend, problem):
    _check(backend, problem)


@settings(max_examples=8, derandomize=True, **_COMMON)
@given(problem=problems(dtypes=_DENSE_DTYPES))
def test_fuzz_fast_dense(problem):
    _check("dense", problem)


@pytest.mark.full
@pytest.mark.parametrize("backend", ["segments", "reference"])
@settings(max_examples=int(os.environ.get("ZORRO_FUZZ_EXAMPLES", 5000)), **_COMMON)
@given(problem=problems())
def test_fuzz_full(backend, problem):
    _check(backend, problem)


@pytest.mark.full
@settings(max_examples=int(os.environ.get("ZORRO_FUZZ_EXAMPLES", 5000)) // 5, **_COMMON)
@given(problem=problems(dtypes=_DENSE_DTYPES))
def test_fuzz_full_dense(problem):
    _check("dense", problem)


_INTERVAL_DTYPES = (torch.float64, torch.float32)  # the compiled CPU kernel's dtypes


@settings(max_examples=8, derandomize=True, **_COMMON)
@given(problem=problems(dtypes=_INTERVAL_DTYPES))
def test_fuzz_fast_intervals(problem):
    _check("intervals", problem)


@pytest.mark.full
@settings(max_examples=int(os.environ.get("ZORRO_FUZZ_EXAMPLES", 5000)) // 5, **_COMMON)
@given(problem=problems(dtypes=_INTERVAL_DTYPES))
def test_fuzz_full_intervals(problem):
    _check("intervals", problem)


def _triton_reasons():
    probe = torch.zeros(1, 1, 1, 16)
    return BACKENDS["triton"].not_supported_reasons(probe, probe, probe, ZorroMask.packed([1]))


@pytest.mark.full
@pytest.mark.skipif(bool(_triton_reasons()), reason="Triton backend not available on CPU tensors here")
@settings(max_examples=60, **_COMMON)
@given(problem=problems(dtypes=(torch.float32, torch.float16)))
def test_fuzz_triton_interpreter(problem):
    mask, q, k, v, rows = problem
    # a draw the backend refuses is rejected, not passed: hypothesis fails the test if too few draws remain
    assume(not BACKENDS["triton"].not_supported_reasons(q, k, v, mask))
    _check("triton", problem)
