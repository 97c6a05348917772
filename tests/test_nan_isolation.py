"""NaN isolation on every CPU path: what a row may not attend never reaches it (issue 11, item 1)."""

import pytest
import torch

from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.testing import generate_qkv, named_masks

from .isolation import check_isolation, poison_everything_unseen

BACKENDS = ["reference", "segments", "dense", "intervals", "auto"]  # auto: dense for these tiny layouts on CPU


def attn_fn(backend):
    if backend == "dense":  # fp32 and below only: the same property, computed in fp32
        return lambda q, k, v, mask, scale=None: zorro_attention(
            q.float(), k.float(), v.float(), mask, scale=scale, backend=backend
        ).to(q.dtype)
    return lambda q, k, v, mask, scale=None: zorro_attention(q, k, v, mask, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_causal_nan_keys_reach_only_their_rows(backend):
    # the issue's repro: NaN in keys 4, 8, 11 (the last token of each document) turned all 12 rows NaN
    m = ZorroMask.packed([5, 4, 3], causal=True)
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    k[:, :, [4, 8, 11]] = float("nan")
    out = zorro_attention(q, k, v, m, backend=backend)
    nan_rows = torch.isnan(out).any(-1).any(1)[0].nonzero().flatten().tolist()
    assert nan_rows == [4, 8, 11]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["padded_keys", "other_modality", "dead_query_rows", "cross_padding"])
def test_reference_leaks_from_the_issue(backend, case):
    pk_rows = None
    if case == "padded_keys" or case == "dead_query_rows":
        m = ZorroMask.zorro(audio=4, video=6, fusion=2, lengths=torch.tensor([[4, 6, 2], [2, 3, 1]]))
    elif case == "other_modality":
        m = ZorroMask.zorro(audio=4, video=6, fusion=2)
    else:
        m = ZorroMask.from_segments([("q", 3)], {"q": "*"}, kv_segments=[("k", 7)], kv_lengths=torch.tensor([[7], [4]]))
    b = m.batch_size or 2
    q, k, v = generate_qkv(m, batch=b, heads=2, head_dim=16, dtype=torch.float64)
    dense = m.to_dense()
    dense = (dense[None] if dense.ndim == 2 else dense).expand(b, -1, -1)
    none = torch.zeros(b, m.num_q, dtype=torch.bool)
    if case == "other_modality":  # poison the video keys: the audio rows may not see them
        pk_rows = torch.zeros(b, m.num_kv, dtype=torch.bool)
        pk_rows[:, 4:10] = True
        check_isolation(attn_fn(backend), q, k, v, m, pk_rows, none, none)
    elif case == "dead_query_rows":  # NaN q and upstream gradient in padded query rows must not reach dk/dv
        dead = ~dense.any(-1)
        check_isolation(attn_fn(backend), q, k, v, m, torch.zeros(b, m.num_kv, dtype=torch.bool), dead, dead)
    else:  # keys no row may attend (padding)
        pk_rows = ~dense.any(1)
        assert pk_rows.any()
        check_isolation(attn_fn(backend), q, k, v, m, pk_rows, none, none)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(named_masks()))
def test_every_row_alone(backend, name):
    """For a few rows at a time, poison everything else: keys they may not attend, other rows' q and gradients."""
    mask = named_masks()[name]
    b = mask.batch_size or 2
    q, k, v = generate_qkv(mask, batch=b, head_dim=16, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rows = torch.rand(b, mask.num_q, generator=gen) < 0.3
        check_isolation(attn_fn(backend), q, k, v, mask, *poison_everything_unseen(mask, b, rows))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", [17, 64, 113])
def test_a_plain_steps_nan_row_stays_out_of_its_neighbours_dq(dtype, n):
    # ATen's CPU flash backward in bf16 (AMX, e.g. Sapphire Rapids) let a NaN query or upstream-gradient row reach the
    # next row's dq: a plain step's gradients were trusted as row-independent (found by test_fuzz_full's draw of a
    # 1-token dead segment before a 17-token one)
    mask = ZorroMask([("dead", 1), ("x", n)], torch.tensor([[False, False], [False, True]]))
    q, k, v = generate_qkv(mask, batch=2, heads=2, kv_heads=1, head_dim=16, dtype=dtype)
    rows = torch.zeros(2, mask.num_q, dtype=torch.bool)
    rows[:, 1::2] = True  # every other row clean: each poisoned row has clean neighbours
    check_isolation(
        lambda *a, **kw: zorro_attention(*a, **kw, backend="segments"),
        q,
        k,
        v,
        mask,
        *poison_everything_unseen(mask, 2, rows),
    )
