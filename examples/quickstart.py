"""Quickstart: build the paper's Figure-2 mask, look at its tile map, run zorro_attention forward and backward, and
check it against the dense reference. Runs on CPU in a few seconds."""
import time

import torch

from zorro_kernels import ZorroMask, reference_attention, zorro_attention


def main() -> None:
    torch.manual_seed(0)
    mask = ZorroMask.zorro(audio=320, video=1568, fusion=8)
    print(mask)
    q, k, v = (torch.randn(1, 4, mask.num_q, 64, requires_grad=True) for _ in range(3))

    t = time.perf_counter()
    out = zorro_attention(q, k, v, mask)
    out.sum().backward()
    t_zorro = time.perf_counter() - t

    t = time.perf_counter()
    ref = reference_attention(q.detach(), k.detach(), v.detach(), mask)
    t_ref = time.perf_counter() - t

    err = (out.detach() - ref).abs().max().item()
    print(f"\nzorro_attention fwd+bwd: {t_zorro * 1e3:.0f} ms | dense-mask reference fwd only: {t_ref * 1e3:.0f} ms")
    print(f"max |zorro - reference| = {err:.2e}; attended fraction {mask.attended_fraction():.3f}")
    # the audio stream is pure: audio outputs ignore the video tokens entirely
    v2 = v.detach().clone()
    v2[:, :, 320:1888] += 1.0
    out2 = zorro_attention(q.detach(), k.detach(), v2, mask)
    print("audio outputs unchanged when only video changes:", torch.equal(out2[:, :, :320], out.detach()[:, :, :320]))


if __name__ == "__main__":
    main()
