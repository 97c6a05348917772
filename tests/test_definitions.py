"""Direct tests from the definitions, for two planted bugs that only a late test caught (issue 21):

- a relative-position bias whose offset sign is flipped: the reference builds its bias through the same index
  function as the backends, so comparing them cannot see it; here the expected bias is computed from the definition
  in the module docstring of zorro_kernels/bias.py, element by element, and the attention from it by hand;
- ``window`` left out of a mask's content key: two masks that differ only in their window would share the cached
  description of the compiled-op path, and the second would run with the first one's window.
"""

import itertools
import math

import pytest
import torch

from zorro_kernels import RelativePositionBias, ZorroMask, zorro_attention
from zorro_kernels._ops import describe

BACKENDS = ["reference", "segments"]  # the dense backend takes no bias (it refuses one)


def _bias_by_definition(table, q_coords, k_coords, extent) -> torch.Tensor:
    """``bias[h, i, j] = table[h, sum_a (d_a + extent_a - 1) * prod_{b > a} (2 * extent_b - 1)]`` with
    ``d = q_coords[i] - k_coords[j]``, 0 where either token is unplaced (a negative coordinate): loops, no library
    code."""
    h, nq, nk = table.shape[0], len(q_coords), len(k_coords)
    out = torch.zeros(h, nq, nk, dtype=table.dtype)
    for i, j in itertools.product(range(nq), range(nk)):
        qi, kj = q_coords[i], k_coords[j]
        if min(qi) < 0 or min(kj) < 0:
            continue
        col = 0
        for a, e in enumerate(extent):
            d = qi[a] - kj[a]
            assert abs(d) < e
            col += (d + e - 1) * math.prod(2 * x - 1 for x in extent[a + 1 :])
        out[:, i, j] = table[:, col]
    return out


def _attention_by_hand(q, k, v, allowed, bias, scale):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale + bias
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row that sees nothing: 0
    return p @ v


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_bias_follows_its_definition(backend):
    """Asymmetric extents and a random table, so a flipped offset (or swapped axes) picks other table entries; two
    unplaced tokens (bias 0) and a mask with two segments."""
    gen = torch.Generator().manual_seed(0)
    coords = [[y, x] for y in range(2) for x in range(3)] + [[-1, -1], [-1, -1]]  # a 2 x 3 grid, 2 unplaced
    extent = (2, 3)
    table = torch.randn(2, (2 * 2 - 1) * (2 * 3 - 1), generator=gen, dtype=torch.float64)
    want = _bias_by_definition(table, coords, coords, extent)
    assert want.abs().sum() > 0 and not torch.equal(want, want.transpose(1, 2))  # the test can see a flip
    rpb = RelativePositionBias(table, torch.tensor(coords), torch.tensor(coords), extent)
    torch.testing.assert_close(rpb.materialize()[0], want, rtol=0, atol=0)

    mask = ZorroMask.from_segments([("grid", 6), ("extra", 2)], {"grid": "*", "extra": "*"})
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = _attention_by_hand(q, k, v, mask.to_dense(), want[None], 0.5)
    got = zorro_attention(q, k, v, mask, bias=rpb, scale=0.5, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _windowed(window):
    return ZorroMask.from_segments([("a", 6), ("b", 5)], {"a": "*", "b": "*"}, window=window)


def test_masks_that_differ_only_in_window_have_different_keys():
    masks = [_windowed(w) for w in (None, (2, 0), (3, 0), (2, 1), (-1, 0))]
    assert len({m.key for m in masks}) == len(masks)
    assert _windowed((2, 0)).key == _windowed((2, 0)).key  # equal content, equal key


def test_the_cached_op_path_keeps_each_masks_window():
    """The custom op rebuilds the mask from its description through a cache keyed by content: two masks that differ
    only in window must each run with their own (the second one would find the first one's mask otherwise)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 8, generator=gen) for _ in range(3))
    outs = []
    for window in ((1, 0), (4, 0)):  # the first fills the cache; the second must not find it
        mask = _windowed(window)
        out, _ = torch.ops.zorro.attention_fwd(q, k, v, *describe(mask), 8**-0.5, "segments")
        ref = zorro_attention(q, k, v, mask, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])
