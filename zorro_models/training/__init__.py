"""Training and evaluation: configs, what a config builds, the tasks and losses, the trainer, checkpoints, DDP.

``config`` (the typed config and its overrides) -> ``build`` (model, data, task from a config; a stored run loaded
back) -> ``trainer`` (the training loop; ``python -m zorro_models.train`` launches it) with ``checkpoint`` (crash-safe
run state) and ``distributed`` (torchrun process groups); ``evaluate`` scores heads and linear probes.
"""
