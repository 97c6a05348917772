"""The programs behind the ``zorro`` command (:mod:`zorro_models.cli`): ``demo``, ``ablate``, ``bench``,
``show_mask``. ``zorro train`` and ``zorro eval`` call :mod:`zorro_models.training` directly."""
