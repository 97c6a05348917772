"""Write clips of the embedded synthetic dataset as real mp4 files (H.264 video, AAC audio) with ``train.csv`` and
``val.csv`` beside them: the folder layout ``data.kind=clips`` reads, as a stand-in for your own clips.

    .venv/bin/python examples/export_clips.py clips_example          # 64 + 32 clips in a few seconds
    .venv/bin/zorro train --config configs/clips.yaml                # trains on them as on any folder of clips

Labels are class names (``class0`` ... ``class7``), as in a VGGSound- or Kinetics-style CSV. The clips are larger than
the demo model's inputs (8 frames of 64x64, 16 kHz audio), so reading them resizes, samples frames and resamples.
"""

import argparse
import csv
from pathlib import Path

import numpy as np

from zorro_models.data import SyntheticAVConfig, SyntheticAVDataset

FPS, SECONDS, SAMPLE_RATE = 8, 1.0, 16000


def write_mp4(path: Path, video: np.ndarray, waveform: np.ndarray) -> None:
    """``video`` uint8 ``(T, H, W, 3)`` at :data:`FPS`; ``waveform`` float32 ``(samples,)`` at :data:`SAMPLE_RATE`."""
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        aus = out.add_stream("aac", rate=SAMPLE_RATE)
        aus.layout = "mono"
        for frame in video:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        for s in range(0, len(waveform), 1024):
            frame = av.AudioFrame.from_ndarray(waveform[None, s : s + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = SAMPLE_RATE, s
            out.mux(aus.encode(frame))
        out.mux(vs.encode(None))
        out.mux(aus.encode(None))


def export(out: Path, train: int = 64, val: int = 32, seed: int = 0) -> None:
    """``train`` + ``val`` clips (separate seeds) into ``out``, listed in ``out/train.csv`` and ``out/val.csv``."""
    config = SyntheticAVConfig(num_frames=int(FPS * SECONDS), image_size=64, sample_rate=SAMPLE_RATE, duration=SECONDS)
    out.mkdir(parents=True, exist_ok=True)
    for split, size, split_seed in (("train", train, seed), ("val", val, seed + 1)):
        data = SyntheticAVDataset(size, config, seed=split_seed)
        rows = []
        for start in range(0, size, 32):
            batch = data.generate(range(start, min(size, start + 32)))
            video = (batch["video"].permute(0, 1, 3, 4, 2) * 255).round().byte().numpy()  # (B, T, H, W, 3)
            for i, index in enumerate(batch["index"].tolist()):
                name = f"{split}_{index:04d}.mp4"
                write_mp4(out / name, video[i], batch["waveform"][i].numpy().astype(np.float32))
                rows.append((name, f"class{int(batch['label'][i])}"))
        with open(out / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
    print(f"wrote {train} + {val} clips, {out / 'train.csv'} and {out / 'val.csv'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (created if missing)")
    parser.add_argument("--train", type=int, default=64, help="training clips (default: %(default)s)")
    parser.add_argument("--val", type=int, default=32, help="validation clips (default: %(default)s)")
    args = parser.parse_args(argv)
    export(args.out, args.train, args.val)


if __name__ == "__main__":
    main()
