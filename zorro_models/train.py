"""``python -m zorro_models.train``: the training entry point torchrun launches, one process per device.

    python -m zorro_models.train --config run.yaml train.steps=1000 optim.lr=3e-4
    torchrun --nproc_per_node=4 -m zorro_models.train --config run.yaml          # DDP, one process per device

The trainer itself is :mod:`zorro_models.training.trainer`; this module only reads the command line and reports an error
as one line per failing rank, as ``zorro train`` does.
"""

from __future__ import annotations

import argparse
import os
import sys

from .training.config import add_config_args, add_run_folder_args, load_config, run_folder_overrides
from .training.trainer import run_training, summary_line
from .utils.errors import run_reporting_errors

__all__ = ["main"]


def main(argv=None) -> int:
    """The torchrun entry point. Errors are one line per failing rank, as ``zorro train``'s; ``--debug`` (or
    ``ZORRO_DEBUG=1``) shows the traceback."""
    prog = "python -m zorro_models.train"
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a Zorro model in this process (torchrun starts one per device)."
    )
    add_config_args(parser)
    add_run_folder_args(parser)
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: ZORRO_DEBUG=1)"
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    def run() -> int:
        cfg = load_config(args.config, list(args.overrides) + run_folder_overrides(args))
        summary = run_training(cfg)
        if rank == 0:
            print(summary_line(summary))
        return 0

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return run_reporting_errors(run, args.debug, prog if world <= 1 else f"{prog} (rank {rank})")


if __name__ == "__main__":
    sys.exit(main())
