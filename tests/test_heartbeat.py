"""Long phases say how far they are at least every HEARTBEAT_SECONDS: embedding, probe fitting, validation, bench."""

import pytest

from zorro_models.training.evaluate import collect_embeddings, probe_all
from zorro_models.utils import reporting
from zorro_models.utils.reporting import HEARTBEAT_SECONDS, Heartbeat


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_line_at_least_every_period_and_never_more_often():
    clock, lines = Clock(), []
    beat = Heartbeat(lines.append, "embedded batches", total=100, every=20, clock=clock)
    for i in range(1, 101):
        clock.t += 7  # a batch takes 7 s: a line every third batch (21 s), never two within 20 s
        beat(i)
    assert len(lines) == 33 and lines[0] == "embedded batches: 3/100 (21 s into this phase)"
    assert HEARTBEAT_SECONDS <= 30  # the bound: progress at least every 30 s


def test_silent_without_a_callback():
    clock = Clock()
    beat = Heartbeat(None, "x", every=1, clock=clock)
    clock.t = 5
    beat(1)  # no error, nothing to say to


@pytest.fixture
def instant_heartbeat(monkeypatch):
    """Every call is a heartbeat (period 0), so a phase that beats at all is seen."""
    monkeypatch.setattr(reporting.Heartbeat.__init__, "__defaults__", (None, 0.0, None))


def test_embedding_and_probe_fitting_report_progress(instant_heartbeat):
    import torch

    from zorro_models import create_model

    class Pre:
        device = torch.device("cpu")

        def __call__(self, batch, regime):
            return {"audio": batch["audio"]}

    model = create_model("zorro_vit_demo", depth=1)
    x = model.example_inputs(batch_size=2)
    batches = [{"audio": x["audio"], "label": torch.tensor([0, 1]), "size": 2} for _ in range(3)]
    lines = []
    train = collect_embeddings(model, Pre(), batches, regimes=("audio-only",), progress=lines.append)
    assert [ln.split(" (")[0] for ln in lines] == ["embedded batches: 1/3", "embedded batches: 2/3"]
    lines.clear()
    probe_all(train, train, multi_label=False, num_classes=2, max_iter=2, progress=lines.append)
    n = len(lines)  # one line per probe: each of the regime's outputs, and all of them together
    assert n >= 2 and [ln.split(" (")[0] for ln in lines] == [f"linear probes fitted: {i}/{n}" for i in range(1, n + 1)]
