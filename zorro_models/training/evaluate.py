"""Evaluation: metrics, embeddings under each input regime, linear probes, and supervised-head scores.

Input regimes (what the model is given):

=============  ===========================  =============================================================
regime         inputs                        outputs that see something
=============  ===========================  =============================================================
audio-visual   audio and video               audio, video, fusion, global
audio-only     audio (video left out)        audio, fusion, global (video is exactly 0)
video-only     video (audio left out)        video, fusion, global (audio is exactly 0)
=============  ===========================  =============================================================

Metrics: top-1 accuracy for single-label data, mean average precision (mAP, the AudioSet metric) for multi-label data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..models.layers import OUTPUTS
from ..utils.reporting import Heartbeat, plot_modality_scores, write_json
from .build import build_dataset, build_preprocessor, eval_loader, num_classes_of

__all__ = [
    "REGIMES",
    "REGIME_OUTPUTS",
    "accuracy",
    "average_precision",
    "mean_average_precision",
    "score",
    "metric_name",
    "collect_embeddings",
    "linear_probe",
    "probe_all",
    "run_probes",
    "evaluate_heads",
    "evaluate_run",
    "OUTPUT_ORDER",
]

REGIMES = {"audio-visual": ("audio", "video"), "audio-only": ("audio",), "video-only": ("video",)}
#: the outputs that carry information under each regime
REGIME_OUTPUTS = {
    "audio-visual": OUTPUTS,
    "audio-only": ("audio", "fusion", "global"),
    "video-only": ("video", "fusion", "global"),
}


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``scores (N, C)`` against int ``labels (N,)``; ties go to the lowest class index."""
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"need scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((scores.argmax(1) == labels.to(scores.device)).float().mean())


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Average precision of one class: ``scores (N,)``, binary ``targets (N,)``; NaN when there is no positive.

    The step-wise area under the precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds in descending order (scikit-learn's definition: tied scores enter together). Without ties it is the
    mean, over the positives, of the precision at each positive's rank.
    """
    if scores.shape != targets.shape or scores.ndim != 1:
        raise ValueError(
            f"need scores and targets of the same (N,) shape, got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    t = targets.to(torch.float64)
    npos = float(t.sum())
    if npos == 0:
        return float("nan")
    s = scores.to(torch.float64)
    order = torch.argsort(s, descending=True, stable=True)
    s, t = s[order], t[order]
    tp = torch.cumsum(t, 0)
    fp = torch.cumsum(1 - t, 0)
    last = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([len(s) - 1])])  # end of each tie group
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / npos
    gain = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((gain * precision).sum())


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over classes with at least one positive: ``scores (N, C)``, multi-hot ``targets (N, C)``."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"need scores and targets of the same (N, C) shape, got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if a == a]
    if not aps:
        raise ValueError("mAP is undefined: no class has a positive example")
    return sum(aps) / len(aps)


def score(scores: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """mAP for multi-label data, else accuracy."""
    return mean_average_precision(scores, labels) if multi_label else accuracy(scores, labels)


def metric_name(multi_label: bool) -> str:
    return "mAP" if multi_label else "accuracy"


# ------------------------------------------------------------------------------------------------- embeddings
def _run_regimes(
    forward: Callable[[dict], dict],
    preprocess,
    batches: Iterable[dict],
    regimes: Sequence[str],
    amp_dtype: Optional[torch.dtype],
    keep: Callable[[str, str], bool],
    progress: Optional[Callable[[str], None]] = None,
    what: str = "batches",
) -> tuple[dict, torch.Tensor]:
    """``forward(inputs) -> {name: (B, X)}`` on every non-empty batch under each regime; the entries ``keep(regime,
    name)`` accepts are concatenated (float32, CPU). ``progress`` gets a line at least every
    :data:`~zorro_models.utils.reporting.HEARTBEAT_SECONDS` (batches done). Returns ``({regime: {name: (N, X)}},
    labels)``."""
    for r in regimes:
        if r not in REGIMES:
            raise ValueError(f"unknown regime {r!r}; choose from {tuple(REGIMES)}")
    device = preprocess.device
    out = {r: {} for r in regimes}
    labels = []
    total = len(batches) if hasattr(batches, "__len__") else None
    beat = Heartbeat(progress, what, total)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i:
                beat(i)
            if batch.get("size", 1) == 0:  # every clip of the batch failed to decode
                continue
            labels.append(batch["label"])
            for r in regimes:
                inputs = preprocess(batch, REGIMES[r])
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    result = forward(inputs)
                for name, value in result.items():
                    if keep(r, name):
                        out[r].setdefault(name, []).append(value.float().cpu())
    if not labels:
        raise ValueError("nothing to evaluate: every batch was empty")
    return {r: {n: torch.cat(v) for n, v in d.items()} for r, d in out.items()}, torch.cat(labels)


def collect_embeddings(
    model,
    preprocess,
    batches: Iterable[dict],
    regimes: Sequence[str] = tuple(REGIMES),
    amp_dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> tuple[dict, torch.Tensor]:
    """Run ``model`` (in eval mode) over ``batches`` under each regime (``progress``: lines of batches done).

    Returns ``(embeddings, labels)``: ``embeddings[regime][output]`` is float32 ``(N, D)`` on CPU for the outputs of
    :data:`REGIME_OUTPUTS`; ``labels`` is ``(N,)`` int or ``(N, K)`` multi-hot. Batches whose every clip was skipped
    (``size == 0``) are passed over.
    """
    was_training = model.training
    model.eval()
    try:
        return _run_regimes(
            lambda x: model(**x),
            preprocess,
            batches,
            regimes,
            amp_dtype,
            keep=lambda r, o: o in REGIME_OUTPUTS[r],
            progress=progress,
            what="embedded batches",
        )
    finally:
        model.train(was_training)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    multi_label: bool = False,
    num_classes: Optional[int] = None,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> float:
    """Fit a linear classifier on frozen features and score it on held-out ones.

    Features are standardised with the training set's mean and std; the classifier (softmax cross-entropy, or
    per-class sigmoid BCE when ``multi_label``) with L2 penalty ``weight_decay * ||W||^2`` is fitted by full-batch
    L-BFGS from zero, so the result is deterministic. Returns accuracy or mAP on the test set.

    Shapes: ``train_x (N, D)``, ``train_y (N,)`` int or ``(N, K)`` multi-hot; the same for test.
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"features must be (N, D) with the same D, got {tuple(train_x.shape)} and {tuple(test_x.shape)}"
        )
    x = train_x.to(torch.float64)
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mu) / sd
    xt = (test_x.to(torch.float64) - mu) / sd
    k = train_y.shape[1] if multi_label else (num_classes or int(max(train_y.max(), test_y.max())) + 1)
    w = torch.zeros(x.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = train_y.to(torch.float64) if multi_label else train_y.long()

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = (
            F.binary_cross_entropy_with_logits(logits, target) if multi_label else F.cross_entropy(logits, target)
        ) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return score(xt @ w + b, test_y, multi_label)


def probe_all(
    train: tuple[dict, torch.Tensor],
    test: tuple[dict, torch.Tensor],
    *,
    multi_label: bool,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """A linear probe per (regime, output) present in both ``train`` and ``test`` (each a
    :func:`collect_embeddings` result), plus ``"all"``: the regime's outputs concatenated. Returns
    ``{regime: {output: metric}}``."""
    (tr, ytr), (te, yte) = train, test
    results = {}
    total = sum(len([o for o in tr[r] if o in te[r]]) + 1 for r in tr if r in te)
    beat, done = Heartbeat(progress, "linear probes fitted", total), 0
    for r in tr:
        if r not in te:
            continue
        outs = [o for o in tr[r] if o in te[r]]
        feats = {o: (tr[r][o], te[r][o]) for o in outs}
        feats["all"] = (torch.cat([tr[r][o] for o in outs], 1), torch.cat([te[r][o] for o in outs], 1))
        results[r] = {}
        for o, (a, b) in feats.items():
            results[r][o] = linear_probe(
                a,
                ytr,
                b,
                yte,
                multi_label=multi_label,
                num_classes=num_classes,
                weight_decay=weight_decay,
                max_iter=max_iter,
            )
            done += 1
            beat(done)
    return results


def run_probes(
    cfg,
    model,
    *,
    device="cpu",
    regimes: Sequence[str] = tuple(REGIMES),
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Linear probes of a (trained) backbone on the probe splits of ``cfg`` (see :func:`~zorro_models.training.build.
    build_dataset`): embeddings of ``probe.train_size`` clips fit the probes, ``probe.test_size`` other clips score
    them. ``progress``, if given, receives a line as each phase starts. Returns ``{"metric": "accuracy" | "mAP",
    "num_classes": K, "results": {regime: {output: metric}}}``."""

    say = progress or (lambda line: None)
    start = time.perf_counter()
    preprocess = build_preprocessor(cfg, model).to(device)
    fit_set = build_dataset(cfg, model, "probe_train")
    test_set = build_dataset(cfg, model, "probe_test")
    multi_label = bool(getattr(fit_set, "multi_label", False))
    amp = torch.bfloat16 if torch.device(device).type == "cuda" and cfg.train.amp != "off" else None
    say(f"embedding {len(fit_set)} clips (probe fitting set) under {len(regimes)} input regimes")
    train = collect_embeddings(model, preprocess, eval_loader(cfg, fit_set), regimes, amp, progress=progress)
    say(
        f"embedding {len(test_set)} clips (probe test set) [{time.perf_counter() - start:.0f} s since the probes began]"
    )
    test = collect_embeddings(model, preprocess, eval_loader(cfg, test_set), regimes, amp, progress=progress)
    n_probes = sum(len(d) + 1 for d in train[0].values())
    say(f"fitting {n_probes} linear probes (L-BFGS) [{time.perf_counter() - start:.0f} s since the probes began]")
    k = num_classes_of(fit_set)
    results = probe_all(
        train,
        test,
        multi_label=multi_label,
        num_classes=k,
        weight_decay=cfg.probe.weight_decay,
        max_iter=cfg.probe.max_iter,
        progress=progress,
    )
    return {"metric": metric_name(multi_label), "num_classes": k, "results": results}


def evaluate_heads(
    model,
    heads,
    preprocess,
    batches: Iterable[dict],
    *,
    multi_label: bool,
    regimes: Sequence[str] = tuple(REGIMES),
    amp_dtype: Optional[torch.dtype] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Score supervised heads (:class:`~zorro_models.SupervisedHeads`) under each regime.

    Returns ``{regime: {head: metric}}`` for each head whose output sees something under the regime, plus
    ``"mean"``: the heads' logits averaged over the outputs present for each sample (the paper's prediction).
    """

    def forward(inputs):
        feats = model.forward_features(**inputs)
        return heads(feats.embeddings, feats.present)

    was = (model.training, heads.training)
    model.eval()
    heads.eval()
    try:
        logits, y = _run_regimes(
            forward,
            preprocess,
            batches,
            regimes,
            amp_dtype,
            keep=lambda r, name: name == "mean" or name in REGIME_OUTPUTS[r],
            progress=progress,
            what="validation batches",
        )
    finally:
        model.train(was[0])
        heads.train(was[1])
    return {r: {name: score(v, y, multi_label) for name, v in d.items()} for r, d in logits.items()}


# ------------------------------------------------------------------------------------------------- a whole run
#: column order of result tables: the outputs, then the aggregates ("mean" of the heads, "all" outputs probed)
OUTPUT_ORDER = (*OUTPUTS, "mean", "all")


def evaluate_run(
    cfg,
    task,
    *,
    probes: bool = False,
    device=None,
    out: Optional[Union[str, Path]] = None,
    label: str = "model",
    info: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Evaluate a trained task (:func:`~zorro_models.training.build.build_task`, e.g. from
    :func:`~zorro_models.training.build.load_run`) under the three input regimes.

    Supervised runs: the heads on the validation split. Contrastive runs (or ``probes=True``): linear probes on the
    frozen backbone (:func:`run_probes`). ``device``: default CUDA when available (and ``train.device`` is not
    ``cpu``). With ``out``, writes ``eval.json`` (the returned dict) and ``eval.png`` (each regime's own output, and
    the aggregate for audio-visual; bars labelled ``label``) there. ``progress``, if given, receives a line as each
    phase starts.

    Returns ``{**info, "task": ..., "heads": {"metric", "results"}, "probes": {"metric", "num_classes",
    "results"}}`` with the parts that apply; ``results`` are ``{regime: {output: metric}}``.
    """

    if device is None:
        device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    task.to(device)
    model = task.model
    report = {**(info or {}), "task": cfg.train.task}
    if cfg.train.task == "supervised":
        val = build_dataset(cfg, model, "val")
        if progress is not None:
            progress(f"scoring the supervised heads on {len(val)} validation clips under {len(REGIMES)} input regimes")
        heads = evaluate_heads(
            model,
            task.heads,
            build_preprocessor(cfg, model).to(device),
            eval_loader(cfg, val),
            multi_label=task.multi_label,
            progress=progress,
        )
        report["heads"] = {"metric": metric_name(task.multi_label), "results": heads}
    if cfg.train.task != "supervised" or probes:
        report["probes"] = run_probes(cfg, model, device=device, progress=progress)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(report, out / "eval.json")
        title, part = next(
            (t, report[k]) for k, t in (("heads", "supervised heads"), ("probes", "linear probes")) if k in report
        )
        res = part["results"]
        av = "mean" if "mean" in res["audio-visual"] else "all"
        bars = {
            label: {
                "audio-only": res["audio-only"]["audio"],
                "video-only": res["video-only"]["video"],
                "audio-visual": res["audio-visual"][av],
            }
        }
        plot_modality_scores(bars, out / "eval.png", metric=part["metric"], title=title)
    return report
