"""ZorroMask: semantics of the constructors, the dense oracle, counts, printing and every bad input."""

import numpy as np
import pytest
import torch

from zorro_kernels import ZorroMask
from zorro_kernels.auto import select_backend
from zorro_kernels.mask import MAX_TOKENS


def test_zorro_rule_matches_the_paper_table():
    m = ZorroMask.zorro(audio=2, video=3, fusion=1)
    d = m.to_dense()
    a, v, f = slice(0, 2), slice(2, 5), slice(5, 6)
    assert d[a, a].all() and not d[a, v].any() and not d[a, f].any()
    assert d[v, v].all() and not d[v, a].any() and not d[v, f].any()
    assert d[f].all()
    assert m.rules == {"audio": ["audio"], "video": ["video"], "fusion": ["audio", "video", "fusion"]}


def test_from_segments_semantics_absent_rule_sees_nothing_and_star_sees_all():
    m = ZorroMask.from_segments([("a", 2), ("b", 0), ("c", 3)], {"a": "*", "c": ["a"]})
    d = m.to_dense()
    assert d.shape == (5, 5)
    assert d[:2].all()  # a sees everything
    assert d[2:, :2].all() and not d[2:, 2:].any()  # c sees a only
    assert m.num_q == 5 and m.num_kv == 5 and m.batch_size is None


def test_lengths_mark_segment_tails_as_padding():
    m = ZorroMask.zorro(audio=3, video=4, fusion=1, lengths=torch.tensor([[3, 4, 1], [1, 2, 1]]))
    d = m.to_dense()
    assert d.shape == (2, 8, 8)
    assert torch.equal(d[0], ZorroMask.zorro(audio=3, video=4, fusion=1).to_dense())
    # sample 1: audio token 0 valid (1, 2 padding); video tokens 3, 4 valid (5, 6 padding); fusion 7 valid
    valid = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    assert not d[1][~valid].any() and not d[1][:, ~valid].any()
    assert d[1][7, valid].all()
    assert d[1][0, 0] and not d[1][0, 3]


def test_cross_attention_layout_and_kv_lengths():
    m = ZorroMask.from_segments(
        [("qa", 1), ("qg", 1)],
        {"qa": ["a"], "qg": "*"},
        kv_segments=[("a", 3), ("v", 2)],
        kv_lengths=torch.tensor([[2, 2]]),
    )
    d = m.to_dense()
    assert d.shape == (1, 2, 5)
    assert d[0, 0].tolist() == [True, True, False, False, False]
    assert d[0, 1].tolist() == [True, True, False, True, True]


def test_causal_is_bottom_right_aligned():
    m = ZorroMask.from_segments([("q", 2)], {"q": "*"}, kv_segments=[("k", 4)], causal=True)
    assert m.to_dense().tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bottleneck_and_full_and_packed():
    b = ZorroMask.bottleneck(audio=2, video=2, bottleneck=1).to_dense()
    assert b[0].tolist() == [True, True, False, False, True]
    assert b[2].tolist() == [False, False, True, True, True]
    assert b[4].all()
    assert ZorroMask.full(audio=2, video=3, fusion=1).to_dense().all()
    p = ZorroMask.packed([2, 3], causal=True).to_dense()
    assert p[:2, :2].tolist() == [[True, False], [True, True]] and not p[:2, 2:].any()
    assert p[4, 2:].all() and not p[2, 3:].any()


def test_zorro_extra_modalities_keep_keyword_order():
    m = ZorroMask.zorro(audio=1, video=2, text=3, fusion=1)
    assert m.q_names == ("audio", "video", "text", "fusion")
    assert m.rules["text"] == ["text"]


@pytest.mark.parametrize("causal", [False, True])
def test_attended_counts_match_dense(causal):
    m = ZorroMask.from_segments(
        [("a", 5), ("b", 7), ("c", 2)],
        {"a": ["a", "c"], "b": "*", "c": ["b"]},
        lengths=torch.tensor([[5, 7, 2], [3, 0, 1]]),
        causal=causal,
    )
    assert m.attended().tolist() == m.to_dense().sum((1, 2)).tolist()
    assert m.sparsity() == pytest.approx(1 - m.to_dense().float().mean().item())


def test_figure2_sparsity():
    # 320^2 + 1568^2 + 8 * 1896 attended out of 1896^2
    assert ZorroMask.zorro(audio=320, video=1568, fusion=8).attended_fraction() == pytest.approx(
        (320**2 + 1568**2 + 8 * 1896) / 1896**2
    )


def test_repr_draws_the_tile_map():
    r = repr(ZorroMask.zorro(audio=320, video=1568, fusion=8))
    assert "ZorroMask(q=[audio:320, video:1568, fusion:8]" in r and "sparsity=28.3%" in r
    rows = r.splitlines()[2:]
    assert rows[0].startswith("#") and "." in rows[0]  # audio rows: full audio tiles, empty video tiles
    assert set("".join(rows)) <= {"#", "+", "."}


def test_with_lengths_keeps_layout():
    m = ZorroMask.zorro(audio=3, video=4, fusion=1)
    m2 = m.with_lengths(torch.tensor([[0, 4, 1]]))
    assert m2.q_sizes == m.q_sizes and m2.batch_size == 1 and not m2.to_dense()[0, :, :3].any()


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: ZorroMask.from_segments([("a", 2), ("a", 3)], {}), ValueError, "duplicate segment name 'a'"),
        (lambda: ZorroMask.from_segments([("a", 2)], {"b": ["a"]}), ValueError, "unknown query segment 'b'"),
        (lambda: ZorroMask.from_segments([("a", 2)], {"a": ["z"]}), ValueError, "unknown key segment 'z'"),
        (lambda: ZorroMask.from_segments([("a", 2.5)], {}), TypeError, "size must be an int"),
        (lambda: ZorroMask.from_segments([("a", "3")], {}), TypeError, "size must be an int"),
        (lambda: ZorroMask.from_segments([("a", -1)], {}), ValueError, r"size must be in \[0, 2147483647\], got -1"),
        (lambda: ZorroMask.from_segments([("a", 0)], {}), ValueError, "hold no tokens"),
        (lambda: ZorroMask.from_segments([], {}), ValueError, "at least one segment"),
        (lambda: ZorroMask.from_segments("audio", {}), TypeError, "sequence of \\(name, size\\) pairs"),
        (lambda: ZorroMask.from_segments([("a", 2)], ["a"]), TypeError, "rules must be a mapping"),
        (
            lambda: ZorroMask.zorro(audio=2, video=3, lengths=torch.tensor([[2, 3]])),
            ValueError,
            "shape \\(B, n_segments\\) = \\(B, 3\\)",
        ),
        (
            lambda: ZorroMask.zorro(audio=2, video=3, lengths=torch.tensor([[2, -1, 0]])),
            ValueError,
            "lengths\\[0, 1\\] \\('video'\\) = -1 is negative",
        ),
        (
            lambda: ZorroMask.zorro(audio=2, video=3, lengths=torch.tensor([[2, 4, 0]])),
            ValueError,
            "lengths\\[0, 1\\] = 4 exceeds the size 3 of segment 'video'",
        ),
        (
            lambda: ZorroMask.zorro(audio=2, video=3, lengths=torch.tensor([[2.0, 3.0, 0.0]])),
            TypeError,
            "integer dtype",
        ),
        (lambda: ZorroMask.zorro(audio=2, video=3, kv_lengths=torch.tensor([[2, 3, 0]])), TypeError, "kv_lengths"),
        (
            lambda: ZorroMask.from_segments([("a", 2)], {"a": "*"}, kv_lengths=torch.tensor([[1]])),
            ValueError,
            "only for cross-attention",
        ),
        (
            lambda: ZorroMask.from_segments(
                [("a", 2)],
                {"a": "*"},
                kv_segments=[("k", 3)],
                lengths=torch.tensor([[1]]),
                kv_lengths=torch.tensor([[1], [2]]),
            ),
            ValueError,
            "disagree on the batch size",
        ),
        (
            lambda: ZorroMask.from_allow([("a", 2)], torch.ones(1, 2, dtype=torch.bool)),
            ValueError,
            "allow must have shape",
        ),
        (lambda: ZorroMask.from_allow([("a", 2)], torch.ones(1, 1)), TypeError, "bool tensor"),
        (lambda: ZorroMask.packed([2, 3], names=["x"]), ValueError, "names has 1 entries"),
        (lambda: ZorroMask.zorro(audio=2, fusion=1, causal=True), TypeError, "size must be an int"),
        (lambda: ZorroMask.from_segments([("a", 2)], {"a": "*"}, causal=1), TypeError, "causal must be a bool"),
    ],
)
def test_bad_layouts_raise_clear_errors(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_tile_map_rejects_bad_blocks():
    m = ZorroMask.zorro(audio=2, video=3, fusion=1)
    with pytest.raises(ValueError, match="block_m must be a positive int, got 0"):
        m.tile_map(0, 16)


def test_glob_and_self_rules_make_group_local_windows():
    segs = [("audio/0", 4), ("audio/1", 4), ("video/0", 6), ("video/1", 6), ("fusion", 2)]
    m = ZorroMask.from_segments(segs, {"audio/*": "self", "video/*": "self", "fusion": "*"})
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[range(4), range(4)] = True
    want[4] = True
    assert torch.equal(m.allow, want)
    cross = ZorroMask.from_segments([("g0", 2), ("g1", 2)], {"g*": "self"}, kv_segments=[("g0", 5), ("g1", 3)])
    assert torch.equal(cross.allow, torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="'self' but there is no key segment named 'g1'"):
        ZorroMask.from_segments([("g0", 2), ("g1", 2)], {"*": "self"}, kv_segments=[("g0", 5)])
    with pytest.raises(ValueError, match="reserved or holds a glob character"):
        ZorroMask.from_segments([("a*", 2)], {})


def test_mask_is_immutable_caller_edits_do_not_reach_it():
    # issue 11 item 2: the mask kept the caller's lengths tensor; its cached plans did not follow edits
    from zorro_kernels import zorro_attention

    L = torch.tensor([[4, 6, 2], [2, 3, 1]])
    m = ZorroMask.zorro(audio=4, video=6, fusion=2, lengths=L)
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    zorro_attention(q, k, v, m, backend="segments")  # builds and caches the plan
    L[1] = torch.tensor([4, 6, 2])
    m.lengths[1] = torch.tensor([4, 6, 2])  # a handed-out copy
    m.allow[0, 1] = True
    assert m.lengths.tolist() == [[4, 6, 2], [2, 3, 1]] and not m.allow[0, 1]
    seg = zorro_attention(q, k, v, m, backend="segments")
    ref = zorro_attention(q, k, v, m, backend="reference")
    assert (seg - ref).abs().max() < 1e-5
    fresh = ZorroMask.zorro(audio=4, video=6, fusion=2, lengths=torch.tensor([[4, 6, 2], [2, 3, 1]]))
    assert m.key == fresh.key
    for name, value in (("causal", True), ("lengths", None), ("q_sizes", (1, 1, 1)), ("window", (1, 1))):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(m, name, value)


@pytest.mark.parametrize("nk", [4, 11, 19])
def test_attended_counts_causal_cross_attention(nk):
    # the causal offset Nk - Nq only matters when Nk != Nq: a count computed with offset 0 must fail here
    m = ZorroMask.from_segments(
        [("a", 5), ("b", 4)],
        {"a": "*", "b": ["k1"]},
        kv_segments=[("k0", 3), ("k1", nk - 3)],
        lengths=torch.tensor([[5, 4], [2, 3]]),
        kv_lengths=torch.tensor([[3, nk - 3], [1, 1]]),
        causal=True,
    )
    assert m.attended().tolist() == m.to_dense().sum((1, 2)).tolist()


def test_packed_causal_is_per_document():
    # issue 11 item 4: packed([3, 2], kv_seq_lens=[3, 4], causal=True) gave row 0 keys 0-2; per document it sees key 0.
    # Issue 20: what the row-wide diagonal cannot say is causal rule cells (bottom-right per document), not refused.
    for q_lens, k_lens in (
        ([3, 2], [3, 2]),
        ([1, 1, 1], [4, 2, 5]),
        ([2, 2], [2, 2]),
        ([3, 2], [3, 4]),
        ([5, 1, 4], [2, 7, 4]),
        ([4, 0, 3], [1, 3, 0]),
    ):
        m = ZorroMask.packed(q_lens, kv_seq_lens=k_lens, causal=True)
        dense = torch.zeros(sum(q_lens), sum(k_lens), dtype=torch.bool)
        qs = ks = 0
        for ql, kl in zip(q_lens, k_lens):  # per document, bottom-right aligned (flash-attn varlen's convention)
            i, j = torch.arange(ql)[:, None], torch.arange(kl)[None]
            dense[qs : qs + ql, ks : ks + kl] = j <= i + (kl - ql)
            qs, ks = qs + ql, ks + kl
        assert torch.equal(m.to_dense(), dense), (q_lens, k_lens)
        assert int(m.attended()) == int(dense.sum()), (q_lens, k_lens)
    assert ZorroMask.packed([3, 2], kv_seq_lens=[3, 4], causal=True).has_causal_cells
    assert not ZorroMask.packed([3, 2], kv_seq_lens=[3, 2], causal=True).has_causal_cells  # the row-wide rule


def test_causal_with_kv_lengths_aligns_to_full_sizes():
    # the documented convention: the diagonal sits at Nk - Nq whatever the valid lengths (flash-attn varlen would
    # align it to each sample's valid keys: 2 keys for row 0 of sample 1 here, not 4)
    m = ZorroMask.from_segments(
        [("q", 2)], {"q": "*"}, kv_segments=[("k", 5)], kv_lengths=torch.tensor([[5], [3]]), causal=True
    )
    d = m.to_dense()
    assert d[0].sum(1).tolist() == [4, 5] and d[1].sum(1).tolist() == [3, 3]


# ------------------------------------------------------------------------------------------------------ int64 edges
# A size or window side past what the kernels index (int32 tokens) used to pass construction and then overflow in
# sparsity(), print(mask) and auto ("can't convert negative int to unsigned", "Overflow when unpacking long long").
@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda: ZorroMask.from_segments([("a", 4)], {"a": "*"}, window=(2**63, 0)), ValueError, "window left"),
        (lambda: ZorroMask.from_segments([("a", 4)], {"a": "*"}, window=(0, 2**31)), ValueError, "window right"),
        (lambda: ZorroMask.from_segments([("a", 4)], {"a": "*"}, window=(np.uint64(2**63), 0)), ValueError, "left"),
        (lambda: ZorroMask.from_segments([("a", 4)], {"a": "*"}, window=(-2, 0)), ValueError, "got -2"),
        (lambda: ZorroMask.from_segments([("a", 4)], {"a": "*"}, window=(True, 0)), TypeError, "window left"),
        (lambda: ZorroMask.from_segments([("a", 2**63)], {}), ValueError, "'a'.*got 9223372036854775808"),
        (lambda: ZorroMask.from_segments([("a", np.uint64(2**63))], {}), ValueError, "got 9223372036854775808"),
        (lambda: ZorroMask.from_segments([("a", True)], {}), TypeError, "size must be an int"),
        (lambda: ZorroMask.from_segments([("a", torch.tensor(True))], {}), TypeError, "size must be an int"),
        (lambda: ZorroMask.packed([2**62, 2**62]), ValueError, "seq0"),
        (lambda: ZorroMask.packed([2**30, 2**30]), ValueError, "2147483648 tokens in all"),
        (lambda: ZorroMask.zorro(audio=2, video=3, lengths=[[2**63, 1, 0]]), ValueError, "9223372036854775808"),
        (
            lambda: ZorroMask.zorro(audio=2, video=3, lengths=np.array([[2**63, 1, 0]], dtype=np.uint64)),
            ValueError,
            "lengths holds 9223372036854775808, beyond int64",
        ),
        (lambda: ZorroMask.zorro(audio=2, video=3, lengths=[[True, 1, 0]]), TypeError, "lengths must hold ints"),
        (lambda: ZorroMask.zorro(audio=2, video=3, lengths=[[-3, 1, 0]]), ValueError, "= -3 is negative"),
    ],
)
def test_sizes_windows_and_lengths_past_int_limits_are_refused_in_one_line(call, exc, msg):
    with pytest.raises(exc, match=msg) as e:
        call()
    assert "\n" not in str(e.value)


def test_numpy_ints_are_taken_as_sizes_windows_and_lengths():
    m = ZorroMask.from_segments(
        [("a", np.int64(3)), ("b", np.uint8(2))],
        {"a": "*", "b": ["b"]},
        window=(np.int32(1), np.int64(-1)),
        lengths=np.array([[3, 1]], dtype=np.uint64),
    )
    assert m.q_sizes == (3, 2) and m.window == (1, -1) and m.lengths.tolist() == [[3, 1]]


def test_counts_are_exact_at_the_token_limit():
    n = MAX_TOKENS
    full = ZorroMask.from_segments([("a", n - 5), ("b", 5)], {"a": "*", "b": "*"}, window=(n, n))
    assert full.attended().tolist() == [n * n] and full.sparsity() == 0.0
    causal = ZorroMask.from_segments([("a", n)], {"a": "*"}, causal=True)
    assert causal.attended().tolist() == [n * (n + 1) // 2]
    band = ZorroMask.from_segments([("a", n)], {"a": "*"}, window=(n, 2))
    assert band.attended().tolist() == [n * (n + 1) // 2 + 2 * n - 3]


@pytest.mark.parametrize("window", [(MAX_TOKENS, 0), (MAX_TOKENS, MAX_TOKENS), (0, MAX_TOKENS)])
def test_widest_windows_count_print_and_choose_like_the_dense_oracle(window):
    m = ZorroMask.from_segments([("a", 5), ("b", 7)], {"a": "*", "b": ["b"]}, window=window)
    assert int(m.attended()) == int(m.to_dense().sum())
    assert "sparsity" in repr(m)
    q = torch.randn(1, 1, 12, 8)
    assert select_backend(q, q, q, m) in ("dense", "segments")
