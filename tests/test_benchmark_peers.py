"""The benchmark suite's peers compute the layout they are timed on: FlexAttention's ``mask_mod`` is the mask's
element rule (segments, lengths, causal aligned bottom-right, the sliding window) on every hand-picked layout."""

import pytest
import torch

from benchmarks.layouts import Layout
from benchmarks.peers import flex_mask_mod
from zorro_kernels import ZorroMask, zorro_attention
from zorro_kernels.testing import named_masks

LAYOUTS = {
    **named_masks(),
    "causal_window": ZorroMask.from_segments([("x", 30)], {"x": "*"}, causal=True, window=(3, -1)),
    "ragged_window": ZorroMask.from_segments(
        [("a", 7), ("b", 9), ("f", 3)],
        {"a": ["a", "f"], "b": ["b", "f"], "f": "*"},
        lengths=torch.tensor([[7, 9, 3], [4, 0, 2]]),
        window=(4, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_flex_mask_mod_is_the_layout(name):
    mask = LAYOUTS[name]
    dense = mask.to_dense()
    dense = dense[None] if dense.ndim == 2 else dense  # (B|1, Nq, Nk)
    mask_mod = flex_mask_mod(Layout(name, "test", name, mask, dense.shape[0], 1, 16), "cpu")
    b, qi, ki = torch.meshgrid(
        torch.arange(dense.shape[0]), torch.arange(mask.num_q), torch.arange(mask.num_kv), indexing="ij"
    )
    got = mask_mod(b, 0, qi, ki).expand_as(dense)
    assert torch.equal(got, dense), f"{name}: {int((got != dense).sum())} of {dense.numel()} pairs differ"


def test_a_wrong_peer_is_recorded_with_its_error():
    """The suite records a peer whose result is outside the tolerance rule (the row says WRONG RESULT with the
    error) instead of failing; a right result has no violation."""
    from benchmarks.measure import Reference, make_inputs, run_once
    from benchmarks.report import summary_lines

    layout = Layout("packed-causal", "packed-causal", "t", ZorroMask.packed([5, 9], causal=True), 1, 2, 16)
    q, k, v, d_out = make_inputs(layout, torch.device("cpu"), torch.float32)
    ref = Reference(layout, q, k, v, d_out, backward=True)
    right = lambda a, b, c: zorro_attention(a, b, c, layout.mask, backend="segments")  # noqa: E731
    out, grads = run_once(right, q, k, v, d_out, backward=True)
    assert ref.violations("zorro", out, grads) == []
    wrong = ref.violations("peer", out + 0.5, grads)
    assert len(wrong) == 1 and wrong[0].startswith("peer out (torch.float32): error 5.000e-01 > bound"), wrong
    row = dict(
        layout="packed-causal", direction="fwd", peer="flex", shape="s", attended_fraction=0.5, median_s=1e-3,
        tflops=0.0, checked="WRONG RESULT: " + wrong[0], wrong_result=wrong, family="packed-causal",
    )  # fmt: skip
    assert any("WRONG RESULT: peer out" in line for line in summary_lines([row]))
