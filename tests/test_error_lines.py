"""Each rank's error reaches the shared stderr as one write of one whole line, so the lines of several ranks cannot
be glued together (print writes the text and its newline separately; unbuffered, as under torchrun, another rank's
line lands between them)."""

from zorro_models.utils import errors


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return len(text)

    def flush(self):
        pass


def test_an_error_is_one_write_of_one_line(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(errors.sys, "stderr", rec)

    def fail():
        raise ValueError("train.batch_size=6 must be divisible by world_size x grad_accum = 4 x 1")

    assert errors.run_reporting_errors(fail, prog="python -m zorro_models.train (rank 1)") == 1
    assert rec.writes == [
        "python -m zorro_models.train (rank 1): error: train.batch_size=6 must be divisible by world_size x "
        "grad_accum = 4 x 1\n"
    ]


def test_an_interrupt_is_one_write_of_one_line(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(errors.sys, "stderr", rec)

    def stop():
        raise KeyboardInterrupt

    assert errors.run_reporting_errors(stop, prog="zorro") == 130
    assert rec.writes == ["zorro: interrupted\n"]
