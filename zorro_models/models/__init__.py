"""The networks: Zorro-ViT, Zorro-Swin and Zorro-HiP, their blocks, tokenizers, readout and heads.

``base`` (the shared model interface and mask rules) -> ``layers`` (attention blocks on zorro_kernels, the masked
readout) -> ``tokenizers`` -> one module per family (``vit``, ``swin``, ``hip``), each registering its presets in
``registry``. ``heads`` holds the task heads the training code puts on a model's outputs.
"""
