"""Quickstart: build the paper's Figure-2 mask, look at its tile map, run zorro_attention forward and backward, check
it against the dense reference, and time it against PyTorch's SDPA given the same mask as a dense boolean matrix.
Runs on CPU in a few seconds."""

import statistics
import time

import torch
import torch.nn.functional as F

from zorro_kernels import ZorroMask, reference_attention, zorro_attention


def median_ms(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms, after one untimed call (which also builds and caches the tile map)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    mask = ZorroMask.zorro(audio=320, video=1568, fusion=8)
    print(mask)
    q, k, v = (torch.randn(1, 4, mask.num_q, 64, requires_grad=True) for _ in range(3))

    out = zorro_attention(q, k, v, mask)
    ref = reference_attention(q.detach(), k.detach(), v.detach(), mask)
    err = (out.detach() - ref).abs().max().item()
    print(f"\nmax |zorro - reference| = {err:.2e}; attended fraction {mask.attended_fraction():.3f}")

    # The same work on both sides: the same q, k, v under the same mask; SDPA gets it as the dense boolean matrix,
    # built once outside the timing. One thread keeps the timings steady on a shared machine; benchmarks/ measures
    # properly (BENCHMARKS.md).
    torch.set_num_threads(1)
    dense = mask.to_dense()
    with torch.no_grad():
        fwd = [
            median_ms(lambda: zorro_attention(q, k, v, mask)),
            median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
        ]
    both = [
        median_ms(lambda: zorro_attention(q, k, v, mask).sum().backward()),
        median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense).sum().backward()),
    ]
    print("median of 5, 1 thread    zorro_attention   SDPA with the dense mask")
    for name, (z, d) in (("forward", fwd), ("forward + backward", both)):
        print(f"{name:<22}  {z:>9.0f} ms  {d:>15.0f} ms   ({d / z:.1f}x)")

    # the audio stream is pure: audio outputs ignore the video tokens entirely
    v2 = v.detach().clone()
    v2[:, :, 320:1888] += 1.0
    out2 = zorro_attention(q.detach(), k.detach(), v2, mask)
    print("audio outputs unchanged when only video changes:", torch.equal(out2[:, :, :320], out.detach()[:, :, :320]))


if __name__ == "__main__":
    main()
