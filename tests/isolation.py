"""The NaN-isolation property, as a check any backend can be put through.

Rule: the output row, the dq row and the dk/dv contributions of a query depend only on the q of that row, its upstream
gradient, and the k/v of the keys it may attend. So poison some key tokens (NaN keys, Inf values), some query rows
(NaN) and some upstream-gradient rows (NaN); every entry the rule says cannot see the poison must come out exactly as
it does from clean inputs, and rows that see nothing stay exactly 0 with zero dq.
"""

from __future__ import annotations

import torch


def _dense(mask, batch: int) -> torch.Tensor:
    d = mask.to_dense()
    return (d[None] if d.ndim == 2 else d).expand(batch, -1, -1)


def taint(dense: torch.Tensor, pk: torch.Tensor, pq: torch.Tensor, pg: torch.Tensor):
    """Entries that may legitimately read poison: ``(out_rows, dq_rows, dkv_rows)``, bool ``(B, Nq), (B, Nq),
    (B, Nk)``, for ``dense (B, Nq, Nk)`` and poisoned keys ``pk (B, Nk)``, queries ``pq`` and gradients ``pg (B,
    Nq)``."""
    live = dense.any(-1)
    out_t = live & (pq | (dense & pk[:, None, :]).any(-1))
    bad_row = out_t | (live & pg)
    dkv_t = (dense & bad_row[:, :, None]).any(1) | (pk & dense.any(1))
    return out_t, bad_row, dkv_t


def poison_everything_unseen(mask, batch: int, rows: torch.Tensor):
    """Poison sets that leave only ``rows (B, Nq)`` clean in the output: every key none of them may attend, every
    other query row and the upstream gradient of every other row."""
    dense = _dense(mask, batch)
    pk = ~(dense & rows[:, :, None]).any(1)
    return pk, ~rows, ~rows


def check_isolation(attn, q, k, v, mask, pk, pq, pg, *, scale=None) -> int:
    """Run ``attn`` on clean and on poisoned inputs and compare what the rule keeps clean, bit for bit.

    q ``(B, H, Nq, D)``, k/v ``(B, Hkv, Nk, D)``; pk ``(B, Nk)``, pq/pg ``(B, Nq)`` bool. Returns the number of
    output rows that were checked (the ones the poison must not reach).
    """
    b = q.shape[0]
    dense = _dense(mask, b).to(q.device)
    out_t, dq_t, dkv_t = taint(dense, pk, pq, pg)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q)

    def run(qq, kk, vv, gg):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (qq, kk, vv))
        out = attn(qq, kk, vv, mask, scale=scale)
        grads = torch.autograd.grad(out, (qq, kk, vv), gg)
        return [out.detach(), *(x.detach() for x in grads)]

    def put(x, where, value):
        return torch.where(where.to(x.device)[:, None, :, None], torch.full_like(x, value), x)

    clean = run(q, k, v, g)
    dirty = run(put(q, pq, float("nan")), put(k, pk, float("nan")), put(v, pk, float("inf")), put(g, pg, float("nan")))
    for name, c, d, t in zip(("out", "dq", "dk", "dv"), clean, dirty, (out_t, dq_t, dkv_t, dkv_t)):
        keep = ~t.to(c.device)[:, None, :, None].expand_as(c)
        bad = (c != d) & keep
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} entries the poison must not reach changed "
            f"(first at {tuple(bad.nonzero()[0].tolist())}: {d[bad][0].item()} vs clean "
            f"{c[bad][0].item()})"
        )
    dead = ~dense.any(-1)[:, None, :, None].expand_as(clean[0])
    for name, x in (("out", dirty[0]), ("dq", dirty[1])):
        assert (x[dead] == 0).all(), f"{name}: a row that sees nothing is not exactly 0 under poison"
    return int((~out_t).sum())
