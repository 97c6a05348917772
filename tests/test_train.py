"""Training machinery: schedule, checkpoints, exact resume, gradient accumulation, fine-tuning, and a two-rank gloo
run against one process on the same global batch."""

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from zorro_models.training.build import with_resolved_lr
from zorro_models.training.checkpoint import latest_checkpoint, load_weights, save_checkpoint
from zorro_models.training.config import load_config
from zorro_models.training.distributed import DistEnv, RankFailure, on_main_rank
from zorro_models.training.trainer import ClipLedger, ResumableSampler, Trainer, warmup_cosine
from zorro_models.utils.errors import error_line

from .helpers import TINY, torchrun_train


def tiny_config(tmp_path, name, *extra):
    return load_config(None, TINY + [f"train.out={tmp_path / name}", *extra])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 100, 0, 0.0) == pytest.approx(1.0)


def test_sampler_shards_cover_the_single_process_order():
    ds = list(range(20))
    one = list(ResumableSampler(ds, 1, 0, seed=3))
    two = [list(ResumableSampler(ds, 2, r, seed=3)) for r in range(2)]
    b = 2  # per-rank batch: global step s covers positions [4s, 4s + 4) of the single-process order
    for s in range(5):
        assert sorted(two[0][s * b : (s + 1) * b] + two[1][s * b : (s + 1) * b]) == sorted(one[4 * s : 4 * s + 4])
    resumed = ResumableSampler(ds, 2, 1, seed=3)
    resumed.set_position(0, 4)
    assert list(resumed) == two[1][4:] and len(resumed) == 6


def test_resume_is_bitwise_identical(tmp_path):
    """7 steps straight vs 3 steps, a checkpoint, and a resumed run to 7 (crossing an epoch boundary: 48 clips are 6
    batches). Bitwise, not approximately: the same operations on the same data in the same order, with every state
    (weights, AdamW moments, scheduler, RNG, data position) restored exactly, give the same bits on one machine."""
    a = Trainer(tiny_config(tmp_path, "straight", "train.steps=7"))
    a.fit()
    b = Trainer(tiny_config(tmp_path, "resumed", "train.steps=7"))
    b.fit(stop_at=3)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000003"
    c = Trainer(tiny_config(tmp_path, "resumed", "train.steps=7", "train.resume=true"))
    assert c.step == 3
    c.fit()
    sa, sc = a.task.state_dict(), c.task.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert c.optimizer.state_dict()["state"][0]["step"] == 7


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Supervised: the mean loss of 2 micro-batches of 4 has the gradient of 1 batch of 8 (to fp32 rounding)."""
    one = Trainer(tiny_config(tmp_path, "one", "train.task=supervised", "train.steps=2"))
    one.fit()
    acc = Trainer(tiny_config(tmp_path, "acc", "train.task=supervised", "train.steps=2", "train.grad_accum=2"))
    acc.fit()
    s1, s2 = one.task.state_dict(), acc.task.state_dict()
    for k in s1:
        a, b = _without_key_biases(k, s1[k]), _without_key_biases(k, s2[k])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def _without_key_biases(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` less the key-projection biases: a key bias adds the same score to every key of a row, which the
    softmax ignores, so its gradient is rounding noise that AdamW turns into steps of up to the learning rate."""
    if name.endswith("qkv.module.bias") or ".qkv.per_stream." in name and name.endswith(".bias"):
        c = value.shape[0] // 3
        return torch.cat([value[:c], value[2 * c :]])
    if name.endswith("attn.kv.bias"):
        return value[value.shape[0] // 2 :]
    return value


def test_finetune_from_contrastive_checkpoint(tmp_path):
    pre = Trainer(tiny_config(tmp_path, "pre", "train.steps=2"))
    summary = pre.fit()
    ft = Trainer(
        tiny_config(
            tmp_path,
            "ft",
            "train.task=supervised",
            "train.steps=1",
            "train.eval_every=1",
            "data.val_size=16",
            f"train.init_from={summary['checkpoint']}",
        )
    )
    for k, v in pre.model.state_dict().items():
        assert torch.equal(ft.model.state_dict()[k], v)
    ft.fit()
    assert latest_checkpoint(tmp_path / "ft") is not None
    val = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl") if '"val"' in line]
    assert len(val) == 1 and 0 <= val[0]["audio-only/audio"] <= 1 and "video-only/video" in val[0]
    assert "audio-only/video" not in val[0]  # the video head sees nothing without video
    with pytest.raises(ValueError, match="eval_every is for supervised"):
        Trainer(tiny_config(tmp_path, "bad", "train.eval_every=5"))


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    # a crash while writing step 4 leaves a temporary folder: the pointer still names the last complete checkpoint
    (root / ".tmp-step_00000004-123").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    other = torch.nn.Linear(3, 2)
    load_weights(other, latest_checkpoint(tmp_path))
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(ValueError, match="does not match"):
        load_weights(torch.nn.Linear(3, 4), latest_checkpoint(tmp_path))


def test_bad_batch_split(tmp_path):
    with pytest.raises(ValueError, match="divisible by world_size x grad_accum"):
        Trainer(tiny_config(tmp_path, "bad", "train.grad_accum=3"))


# ------------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    """Set torchrun's environment for ``rank`` in this process."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def _rank_main(rank: int, world: int, port: int, overrides: list) -> None:
    _as_rank(rank, world, port)
    from zorro_models.training.trainer import run_training

    run_training(load_config(None, overrides))


def _spawn_ranks(fn, world: int, overrides, out, tries: int = 3, timeout: float = 600) -> None:
    """``mp.spawn`` the ranks, again (fresh port, fresh run folder) when a rank was *killed by a signal*: on a loaded
    machine gloo's TCP set-up can abort a rank from one of its threads ("terminate called without an active
    exception", SIGABRT), which says nothing about our code. An exception raised by a rank fails at once; ranks still
    running after ``timeout`` seconds are killed and the test fails (a hang must not hang the suite)."""
    for attempt in range(tries):
        ranks = mp.spawn(fn, args=(world, _free_port(), overrides()), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    for p in ranks.processes:
                        p.kill()
                        p.join()
                    pytest.fail(f"the {world} ranks were still running after {timeout} s: a hang")
            return
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == tries - 1:
                raise
            shutil.rmtree(out, ignore_errors=True)


@pytest.mark.ddp
@pytest.mark.parametrize("task", ["contrastive", pytest.param("supervised", marks=pytest.mark.full)])
def test_two_gloo_ranks_match_one_process(tmp_path, task):
    """Two CPU ranks with batch 4 each vs one process with batch 8 over the same clips: the contrastive loss sees the
    gathered global batch (negatives from both ranks, gradients through the gather), DDP averages the gradients, so
    the weights after 3 steps agree with the single process to fp32 rounding (sums happen in another order)."""
    common = TINY + [f"train.task={task}", "train.steps=3"]
    single = Trainer(load_config(None, common + [f"train.out={tmp_path / 'single'}"]))
    single.fit()
    _spawn_ranks(_rank_main, 2, lambda: common + [f"train.out={tmp_path / 'ddp'}"], tmp_path / "ddp")
    ref = single.task.state_dict()
    twin = Trainer(load_config(None, common + [f"train.out={tmp_path / 'twin'}"])).task  # same init as both runs
    init = {k: v.clone() for k, v in twin.state_dict().items()}
    load_weights(twin, latest_checkpoint(tmp_path / "ddp"))
    for k, v in twin.state_dict().items():
        a, b = _without_key_biases(k, v), _without_key_biases(k, ref[k])
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(init[k], v) for k, v in twin.state_dict().items())  # training did move the weights
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-4, abs=1e-5)


def _rank_record(rank: int, world: int, port: int, overrides: list) -> None:
    """A rank that trains and writes ``rank<r>.json`` into ``train.out``: the data positions ``(epoch,
    batch_in_epoch)`` of the micro-batches it trained on, its counters at the end, and the error that stopped it (and
    the line the CLI prints for it)."""
    _as_rank(rank, world, port)
    warnings.simplefilter("ignore")  # the skipping-clip warnings
    import torch.distributed as dist

    cfg = load_config(None, overrides)
    trainer, error, line, trained = Trainer(cfg), None, None, []
    batches = trainer.batches

    def recording():
        for batch in batches():
            trained.append([trainer.epoch, trainer.batch_in_epoch])
            yield batch

    trainer.batches = recording
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 -- recorded, so that the test sees what every rank ended with
        error, line = f"{type(e).__name__}: {e}", error_line(e)
    finally:
        dist.destroy_process_group()
    record = {
        "trained": trained,
        "step": trainer.step,
        "batch_in_epoch": trainer.batch_in_epoch,
        "skipped": trainer.skipped,
        "dropped": trainer.clips.dropped,
        "error": error,
        "line": line,
    }
    (Path(cfg.train.out) / f"rank{rank}.json").write_text(json.dumps(record))


def _clips_split_over_two_ranks(tmp_path, bad_on_rank_1, rows: int, *extra):
    """Overrides for a supervised run of two ranks (4 clips each per micro-batch) on a clip list of ``rows`` clips
    where the clips that epoch 0's sampler hands to rank 1 at the positions ``bad_on_rank_1`` are corrupt files and
    every other clip is readable."""
    from tests.helpers import write_clip

    pytest.importorskip("av")
    write_clip(tmp_path / "ok.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"not an mp4 at all")
    rank_1 = list(ResumableSampler(list(range(rows)), num_replicas=2, rank=1, seed=0))  # train.seed=0
    bad = {rank_1[p] for p in bad_on_rank_1}
    (tmp_path / "train.csv").write_text(
        "path,label\n" + "".join(f"{'bad' if i in bad else 'ok'}.mp4,{i % 2}\n" for i in range(rows))
    )
    return TINY + [
        "data.kind=clips",
        f"data.train_csv={tmp_path / 'train.csv'}",
        "data.duration=0.5",
        "train.task=supervised",
        "train.batch_size=8",
        "train.seed=0",
        f"train.out={tmp_path / 'run'}",
        *extra,
    ]


def _rank_records(out, world=2):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.ddp
def test_unreadable_clips_of_one_rank_stop_every_rank(tmp_path):
    """Every clip rank 1 gets is corrupt, rank 0's are fine: half of the global batch is unreadable, so training
    stops. It used to stop on rank 1 alone (100% of *its* clips), while rank 0 waited in its gradient all-reduce for
    a rank that had gone (a hang until the process-group timeout, or a gloo connection error): now both ranks decide
    on the global counts and raise the same error at the same micro-batch."""
    overrides = _clips_split_over_two_ranks(tmp_path, range(8), 16, "train.steps=2")
    _spawn_ranks(_rank_record, 2, lambda: overrides, tmp_path / "run", timeout=120)
    records = _rank_records(tmp_path / "run")
    for r in records:
        assert r["error"] == (
            "ValueError: 8 of the last 16 training clips of this epoch could not be read (only 8 "
            "could; 8 unreadable in all): stopping, as at least 50% unreadable means a broken clip "
            "list or data.root, not bad luck (the skipping-clip warnings give causes)"
        )
        assert r["trained"] == [] and r["step"] == 0  # every micro-batch had an empty part on rank 1


@pytest.mark.ddp
def test_a_micro_batch_one_rank_cannot_read_is_skipped_by_every_rank(tmp_path):
    """Rank 1's second micro-batch of epoch 0 is all corrupt, rank 0's is readable. Rank 1 used to skip it alone:
    its gradients were then averaged with rank 0's *second* micro-batch while it trained on its third, and its data
    position ran a batch ahead of the one rank 0 saved. Now both ranks skip it (rank 0's 4 readable clips of it are
    dropped and counted) and train on the same micro-batches, with the same counters."""
    overrides = _clips_split_over_two_ranks(tmp_path, range(4, 8), 24, "train.steps=2")
    _spawn_ranks(_rank_record, 2, lambda: overrides, tmp_path / "run", timeout=120)
    records = _rank_records(tmp_path / "run")
    for r in records:
        assert r["error"] is None
        assert r == {
            "trained": [[0, 1], [0, 3]],
            "step": 2,
            "batch_in_epoch": 3,
            "skipped": 8,
            "dropped": 4,
            "error": None,
            "line": None,
        }
    assert [json.loads(line)["skipped"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [0, 8]


def _other_rank(clips, unreadable, empty, failed=0):
    """A fake all-reduce: sums this rank's ``(clips, unreadable, empty, failed)`` with another rank's."""

    def all_reduce(vec):
        assert vec.dtype == torch.int64 and vec.shape == (4,)
        vec += torch.tensor([clips, unreadable, empty, failed])

    return all_reduce


def _rank_with_a_full_disk(rank: int, world: int, port: int, job: tuple) -> None:
    """:func:`_rank_record` with ``job = (writer, overrides)``, where the writer
    ``zorro_models.training.trainer.<writer>`` (only rank 0 writes) fails as on a full disk."""
    import zorro_models.training.trainer

    writer, overrides = job

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "somewhere")

    setattr(zorro_models.training.trainer, writer, full)
    _rank_record(rank, world, port, overrides)


@pytest.mark.ddp
@pytest.mark.parametrize(
    "work",
    [
        pytest.param("run folder", marks=pytest.mark.full),
        "checkpoint",
        pytest.param("validation", marks=pytest.mark.full),
    ],
)
def test_rank_0_failing_its_own_work_stops_every_rank(tmp_path, work):
    """Rank 0 alone prepares the run folder, writes checkpoints and validates. When that failed, rank 0 left with its
    error while rank 1 waited for it in a barrier or its next all-reduce (a hang under nccl; gloo's "Connection closed
    by peer", which says nothing of the cause). Now every rank waits for that work by an all-reduce of a failed flag:
    rank 1 raises too, with rank 0's line, at the same step."""
    out, full = tmp_path / "run", "[Errno 28] No space left on device: 'somewhere'"
    step, line, overrides = 1, full, TINY + ["train.steps=2", "train.ckpt_every=1", f"train.out={out}"]
    if work == "run folder":
        rank_fn, job, what, step = _rank_with_a_full_disk, ("save_config", overrides), f"preparing train.out={out}", 0
    elif work == "checkpoint":
        rank_fn, job, what = _rank_with_a_full_disk, ("save_checkpoint", overrides), "writing the checkpoint of step 1"
    else:
        rank_fn, job = (
            _rank_record,
            _clips_split_over_two_ranks(
                tmp_path, [], 16, "train.steps=2", "train.eval_every=1", f"data.val_csv={tmp_path / 'gone.csv'}"
            ),
        )
        line, what = f"clip list {tmp_path / 'gone.csv'} does not exist", "validating at step 1"
    _spawn_ranks(rank_fn, 2, lambda: job, out, timeout=120)
    rank_0, rank_1 = _rank_records(out)
    assert rank_0["line"] == line
    assert rank_1["line"] == f"rank 0 failed {what}: {line}"
    assert rank_0["step"] == rank_1["step"] == step


@pytest.mark.ddp
def test_a_raising_clip_of_one_rank_stops_every_rank(tmp_path):
    """data.on_error=raise and one corrupt clip, in rank 1's second micro-batch. Its ClipError used to stop rank 1
    alone, while rank 0 waited for it in the next all-reduce. Now the micro-batch's all-reduce carries the failure:
    both ranks stop at that micro-batch, rank 0 with rank 1's line."""
    overrides = _clips_split_over_two_ranks(tmp_path, [5], 16, "train.steps=2", "data.on_error=raise")
    _spawn_ranks(_rank_record, 2, lambda: overrides, tmp_path / "run", timeout=120)
    rank_0, rank_1 = _rank_records(tmp_path / "run")
    assert rank_1["error"].startswith(f"ClipError: {tmp_path / 'bad.mp4'}: cannot decode")
    assert rank_0["line"] == f"rank 1 failed reading its training clips: {rank_1['line']}"
    assert rank_0["trained"] == rank_1["trained"] == [[0, 1]] and rank_0["step"] == rank_1["step"] == 1


def test_on_main_rank_shares_rank_0_failure(monkeypatch):
    """What the two-rank tests check end to end, with fake collectives: rank 1 raises rank 0's failure as one line;
    one process calls no collective and raises the error as it is."""
    import torch.distributed as dist

    def failed_on_rank_0(flag):
        flag += 1

    def rank_0_line(lines, mine):
        assert mine is None
        lines[:] = ["[Errno 28] No space left on device", None]

    monkeypatch.setattr(dist, "all_reduce", failed_on_rank_0)
    monkeypatch.setattr(dist, "all_gather_object", rank_0_line)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    rank_1 = DistEnv(1, 2, 1, torch.device("cpu"))
    with pytest.raises(RankFailure, match=r"^rank 0 failed writing: \[Errno 28\] No space left on device$"):
        on_main_rank(rank_1, pytest.fail, "writing")  # rank 0's work never runs on rank 1

    def no_collective(*args):
        raise AssertionError("a collective in one process")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    monkeypatch.setattr(dist, "all_gather_object", no_collective)
    alone, disk_full = DistEnv(0, 1, 0, torch.device("cpu")), OSError(errno.ENOSPC, "No space left on device")
    assert on_main_rank(alone, lambda: 7, "writing") == 7

    def write():
        raise disk_full

    with pytest.raises(OSError) as raised:
        on_main_rank(alone, write, "writing")
    assert raised.value is disk_full


def test_clip_ledger_shares_a_raising_clip():
    """A rank whose micro-batch raised passes its error to every rank through the micro-batch's all-reduce; one
    process raises it as it is."""
    shared = []

    def fail_together(error, what):
        shared.append((error, what))
        raise RankFailure(what)

    error = ValueError("bad.mp4")
    ledger = ClipLedger(_other_rank(4, 0, 0), fail_together=fail_together)
    with pytest.raises(RankFailure):
        ledger.admit(0, 0, error)
    ledger = ClipLedger(_other_rank(0, 0, 1, failed=1), fail_together=fail_together)  # the other rank's raised
    with pytest.raises(RankFailure):
        ledger.admit(4, 0)
    assert shared == [(error, "reading its training clips"), (None, "reading its training clips")]
    with pytest.raises(ValueError) as raised:
        ClipLedger().admit(0, 0, error)
    assert raised.value is error


def test_clip_ledger_takes_its_decisions_from_every_rank():
    """What the two-rank tests above check end to end, without processes: the micro-batch's counts are summed over
    the ranks before deciding, so a rank with a readable micro-batch skips it when another rank's is empty, and stops
    when the ranks together read too few clips, although its own clips were all readable."""
    ledger = ClipLedger(_other_rank(4, 4, 1))  # the other rank's micro-batch: 4 clips, all unreadable
    ledger.start_epoch()
    assert ledger.admit(4, 0) is False
    assert (ledger.skipped, ledger.dropped) == (8, 4)  # 4 unreadable on the other rank, this rank's 4 dropped
    with pytest.raises(
        ValueError,
        match=r"^4 of the last 8 training clips of this epoch could not be read \(only 4 "
        r"could; 4 unreadable in all\)",
    ):
        ledger.end_epoch()  # 50% unreadable over both ranks, 0% here
    ledger = ClipLedger(_other_rank(4, 0, 0))  # the other rank read its micro-batch
    ledger.start_epoch()
    assert ledger.admit(0, 4) is False and (ledger.skipped, ledger.dropped) == (8, 4)
    assert ledger.admit(3, 1) is True and ledger.admit(4, 0) is True
    ledger.end_epoch()  # 5 of 24 unreadable
    assert "5 could not be read (see the warnings above) and 4 readable one(s) were dropped" in ledger.summary()


def test_clip_ledger_of_one_process_counts_its_own_clips():
    """One process: no collective, an empty batch is skipped with nothing dropped, and the share is its own."""
    ledger = ClipLedger()
    ledger.start_epoch()
    assert ledger.admit(2, 2) is True and ledger.admit(0, 4) is False
    assert (ledger.skipped, ledger.dropped) == (6, 0)
    with pytest.raises(ValueError, match=r"^6 of the last 8 training clips of this epoch"):
        ledger.end_epoch()
    assert ledger.summary().startswith("6 clip(s) could not be read and were skipped so far")


def _gather_main(rank: int, world: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from zorro_models.training.distributed import all_gather_nograd, gather_with_grad

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = 2 + rank  # uneven: rank 0 holds 2 rows, rank 1 holds 3
        x = torch.full((n, 2), float(rank + 1), requires_grad=True)
        g = gather_with_grad(x)
        weights = torch.arange(1.0, 11.0).view(5, 2)
        (g * weights).sum().backward()  # every rank's loss; rank r's rows get the sum over ranks of their weights
        flags = all_gather_nograd(torch.ones(n, dtype=torch.bool))
        torch.save({"gathered": g.detach(), "grad": x.grad, "flags": flags}, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_gather_with_grad_uneven_ranks(tmp_path):
    mp.spawn(_gather_main, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    expected = torch.tensor([[1.0, 1.0]] * 2 + [[2.0, 2.0]] * 3)
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)
    weights = torch.arange(1.0, 11.0).view(5, 2)
    assert torch.equal(r0["grad"], 2 * weights[:2]) and torch.equal(r1["grad"], 2 * weights[2:])
    assert r0["flags"].shape == (5,) and r1["flags"].all()


@pytest.mark.full
@pytest.mark.ddp
def test_torchrun_entry_point(tmp_path):
    """The documented command: torchrun (here `python -m torch.distributed.run`) with the training module."""
    out = tmp_path / "run"
    proc = torchrun_train([*TINY, "train.steps=2", "train.threads=1", f"train.out={out}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_00000002"
    assert len(losses(out)) == 2  # only rank 0 logged


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["contrastive", "supervised"])
def test_cuda_bf16_training_and_resume(tmp_path, task):
    """On CUDA, amp=auto trains under bf16 autocast; a resumed run matches the straight one closely (CUDA kernels
    may reduce in a different order from run to run, so not bitwise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    extra = [f"train.task={task}", "train.steps=6", "train.device=cuda"]
    straight = Trainer(tiny_config(tmp_path, "straight", *extra))
    assert straight.amp_dtype == torch.bfloat16 and straight.device.type == "cuda"
    straight.fit()
    first = Trainer(tiny_config(tmp_path, "resumed", *extra))
    first.fit(stop_at=3)
    resumed = Trainer(tiny_config(tmp_path, "resumed", *extra, "train.resume=true"))
    resumed.fit()
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(map(math.isfinite, a)) and a == pytest.approx(b, rel=2e-2, abs=2e-2)
    sa, sb = straight.task.state_dict(), resumed.task.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=5e-2, atol=5e-3)


# ------------------------------------------------------------------------------------------------- run folders
def test_a_run_folder_that_holds_a_run_is_refused_unless_told(tmp_path):
    """A second `zorro train` into the same train.out used to prune the old run's checkpoints, overwrite its step,
    replace config.yaml and mix both runs in metrics.jsonl."""
    Trainer(tiny_config(tmp_path, "run", "train.steps=2")).fit()
    run = tmp_path / "run"

    def stamps():  # the run's files; the folder's lock file is taken and released by each attempt
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".zorro.lock"}

    before = stamps()
    with pytest.raises(
        FileExistsError,
        match=r"already holds a run \(checkpoints \(newest step_00000002\), "
        r"metrics.jsonl, config.yaml\).*train.resume=true \(zorro train "
        r"--resume\).*train.overwrite=true",
    ):
        Trainer(tiny_config(tmp_path, "run", "train.steps=3", "train.seed=1"))
    assert stamps() == before  # nothing of the old run touched
    with pytest.raises(ValueError, match="exclude each other"):
        Trainer(tiny_config(tmp_path, "run", "train.resume=true", "train.overwrite=true"))
    fresh = Trainer(tiny_config(tmp_path, "run", "train.steps=1", "train.seed=1", "train.overwrite=true"))
    assert latest_checkpoint(run).name == "step_00000002"  # deleted only when the new run starts
    fresh.fit()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # a folder without a run is fine to start in
    Trainer(tiny_config(tmp_path, "other", "train.steps=0")).fit()
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_resume_refuses_changes_that_alter_the_run_and_records_allowed_ones(tmp_path):
    """model.mask=full used to resume a Zorro run and rewrite its config; optim.lr=0.5 was recorded while the
    schedule kept 1e-3 (the scheduler state restores the old base lr)."""
    Trainer(tiny_config(tmp_path, "run", "train.steps=2")).fit()
    for change in ("model.mask=full", "optim.lr=0.5", "train.batch_size=4", "data.seed=3"):
        key = change.split("=")[0]
        with pytest.raises(ValueError, match=rf"cannot change {key}=.* -> .*alters the run"):
            Trainer(tiny_config(tmp_path, "run", "train.steps=2", "train.resume=true", change))
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    resumed = Trainer(
        tiny_config(tmp_path, "run", "train.steps=4", "train.resume=true", "train.ckpt_every=1", "train.log_every=2")
    )
    assert resumed.step == 2 and resumed.resume_changes["train.steps"] == [2, 4]
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before  # written when training starts
    resumed.fit()
    record = json.loads((tmp_path / "run" / "resumes.jsonl").read_text())
    assert record["step"] == 2 and record["changed"] == {
        "train.steps": [2, 4],
        "train.ckpt_every": [0, 1],
        "train.log_every": [1, 2],
    }
    assert "steps: 4" in (tmp_path / "run" / "config.yaml").read_text()
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at the new step 4


def test_resume_drops_metrics_of_steps_it_trains_again(tmp_path):
    """A run killed after its step-2 checkpoint but with steps 3-4 logged: the resumed run logs 3 and 4 once."""
    Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=0")).fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")  # as if killed during the last save
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and a torn line
    Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.resume=true")).fit()
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.ckpt_every=2")).fit()
    state = tmp_path / "run" / "checkpoints" / "step_00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:64])
    resumed = Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.resume=true"))
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert "skipped step_00000004" in err and "state.pt is 64 bytes" in err and "resumed from" in err


def test_an_all_unreadable_clip_list_stops_with_a_count(tmp_path):
    """Every clip missing: every batch was skipped, forever, at 100% CPU. Now: an error counting them, at once."""
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"gone{i}.mp4,{i % 2}\n" for i in range(6)))
    cfg = tiny_config(
        tmp_path,
        "run",
        "data.kind=clips",
        f"data.train_csv={tmp_path / 'train.csv'}",
        "train.task=supervised",
        "train.batch_size=2",
        "train.steps=3",
    )
    with pytest.warns(RuntimeWarning, match="skipping clip"), _deadline(30):
        with pytest.raises(
            ValueError,
            match=r"6 of the last 6 training clips of this epoch could not be read "
            r"\(none could; 6 unreadable in all\)",
        ):
            Trainer(cfg).fit()


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging the suite (the bug this guards against is an endless loop)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_mostly_unreadable_clip_list_stops(tmp_path, monkeypatch):
    """Two thirds of the clips unreadable over the last UNREADABLE_WINDOW clips (made small here): stop."""
    import zorro_models.training.trainer as train_mod
    from tests.helpers import write_clip

    pytest.importorskip("av")
    write_clip(tmp_path / "ok.mp4")
    rows = "".join(f"{'ok' if i % 3 == 0 else f'gone{i}'}.mp4,{i % 2}\n" for i in range(60))
    (tmp_path / "train.csv").write_text("path,label\n" + rows)
    monkeypatch.setattr(train_mod, "UNREADABLE_WINDOW", 12)
    cfg = tiny_config(
        tmp_path,
        "run",
        "data.kind=clips",
        f"data.train_csv={tmp_path / 'train.csv'}",
        "data.duration=0.5",
        "train.task=supervised",
        "train.batch_size=4",
        "train.steps=100",
    )
    with pytest.warns(RuntimeWarning, match="skipping clip"):
        with pytest.raises(ValueError, match=r"(\d+) of the last 1[2-5] training clips could not be read \(only"):
            with _deadline(60):
                Trainer(cfg).fit()


def test_zero_batch_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"need train.batch_size >= 1.*got 0"):
        Trainer(tiny_config(tmp_path, "bad", "train.batch_size=0"))


def test_gradient_clipping_bounds_the_update(tmp_path):
    """The gradient the optimizer sees has norm <= optim.clip_grad_norm, and the norm before clipping was above it."""
    trainer = Trainer(tiny_config(tmp_path, "run", "optim.clip_grad_norm=0.01"))
    seen = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for p in trainer.task.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    trainer.optimizer.register_step_pre_hook(before_step)
    logs = trainer.train_step(trainer.batches())
    assert float(logs["grad_norm"]) > 0.05 and seen[0] == pytest.approx(0.01, rel=1e-3)


def test_a_run_killed_while_saving_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """End to end: the step-4 save dies just before its folder is renamed into place; resuming starts at step 2 (the
    step being saved is all that is lost) and ends bitwise where the uninterrupted run ends."""
    straight = Trainer(tiny_config(tmp_path, "straight", "train.steps=4"))
    straight.fit()
    crashed = Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.ckpt_every=2"))
    replace = os.replace

    def dying_replace(src, dst):
        if os.path.basename(dst) == "step_00000004":
            raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch it on the way out
        return replace(src, dst)

    with monkeypatch.context() as mp:
        mp.setattr(os, "replace", dying_replace)
        with pytest.raises(KeyboardInterrupt):
            crashed.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    resumed = Trainer(tiny_config(tmp_path, "run", "train.steps=4", "train.ckpt_every=2", "train.resume=true"))
    assert resumed.step == 2
    resumed.fit()
    sa, sb = straight.task.state_dict(), resumed.task.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert not [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_zorro_hip_tiny_trains_at_its_own_lr():
    """At the default 1e-3 ``zorro_hip_tiny``'s embeddings collapse to a constant (InfoNCE at ln 64 from step 15; at
    1e-4 they head there in 40-step runs); at 5e-5 its 200-step run learns (3.958 at step 200) and beats the untrained
    model on every probe (docs/models.md)."""
    from zorro_models.models import registry

    assert registry.preset_lr("zorro_hip_tiny") == 5e-5
    cfg = with_resolved_lr(load_config(None, ["model.name=zorro_hip_tiny"]))
    assert cfg.optim.lr == 5e-5
    assert with_resolved_lr(load_config(None, ["model.name=zorro_hip_demo"])).optim.lr == 1e-3


def test_a_run_without_optim_lr_trains_at_its_presets_lr_and_records_it(tmp_path, monkeypatch):
    """``optim.lr`` unset: the preset's learning rate where it names one (``zorro_swin_tiny`` collapses at the
    default 1e-3 and learns at 1e-4: docs/models.md), else 1e-3; an explicit ``optim.lr`` wins; config.yaml records
    the number, so a resume that sets none continues at it."""
    from zorro_models.models import registry

    assert registry.preset_lr("zorro_swin_tiny") == 1e-4 and registry.preset_lr("zorro_vit_tiny") is None
    preset = registry._preset("zorro_vit_tiny")
    monkeypatch.setitem(registry._REGISTRY, "vit_slow", preset._replace(name="vit_slow", lr=2e-4))

    def lr_of(trainer):
        return trainer.optimizer.param_groups[0]["initial_lr"]

    default = Trainer(tiny_config(tmp_path, "default", "train.steps=0"))
    assert lr_of(default) == 1e-3
    default.close()
    run = Trainer(tiny_config(tmp_path, "preset", "model.name=vit_slow", "train.steps=2"))
    assert lr_of(run) == 2e-4
    run.fit()
    assert "lr: 0.0002" in (tmp_path / "preset" / "config.yaml").read_text()
    resumed = Trainer(tiny_config(tmp_path, "preset", "model.name=vit_slow", "train.steps=3", "train.resume=true"))
    assert lr_of(resumed) == 2e-4 and "optim.lr" not in resumed.resume_changes
    resumed.close()
    explicit = Trainer(tiny_config(tmp_path, "explicit", "model.name=vit_slow", "optim.lr=5e-4", "train.steps=0"))
    assert lr_of(explicit) == 5e-4
    explicit.close()
