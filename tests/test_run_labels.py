"""A run's lines carry its own label: the full-attention run inside ``zorro demo`` is not "[zorro]"."""

from zorro_models.commands import demo
from zorro_models.training.trainer import progress_line

from .helpers import TINY


def test_progress_line_carries_the_label():
    assert progress_line(10, 20, 10, 20, 4.0, 5.0).startswith("[zorro] step 10/20")
    assert progress_line(10, 20, 10, 20, 4.0, 5.0, label="full attention").startswith("[full attention] step 10/20")


def test_the_demo_labels_each_trainer_by_its_mask(monkeypatch, tmp_path):
    labels = []

    class Stop(Exception):
        pass

    def fit(self, *a, **k):
        labels.append(self.label)
        raise Stop

    monkeypatch.setattr(demo.Trainer, "fit", fit)
    monkeypatch.setattr(demo, "run_probes", lambda *a, **k: {"results": {}})
    for mask in ("full", "zorro"):
        try:
            demo.run_demo(str(tmp_path / mask), masks=(mask,), baseline=False, overrides=TINY, verbose=False)
        except Stop:
            pass
    assert labels == ["full attention", "Zorro"]
