"""Issue 20's Gemma-3-like row through a tiny random Gemma 3 (Hugging Face transformers): the model on
``attn_implementation="zorro"`` against the same weights on "sdpa", on CPU.

    python -m benchmarks.hf_gemma3 [--threads N] [--layers L]

Per sample 1024 text tokens in 5 runs around 4 images of 256 tokens, the images at different positions in the two
samples (the layout of ``benchmarks.cpu_costs gemma3``), B=2; the text model has 8 heads of 64 (hidden 512) and full
attention in every layer, so each layer's attention is that row. Reported: the forward (no grad) and forward+backward
(loss on the text tokens) of the whole model, and the masks alone (transformers' ``create_masks_for_vision_model``:
zorro reads the composed mask functions into a ZorroMask, sdpa materialises the dense ``(B, 1, N, N)`` mask).

Figures are the minimum CPU time (``time.process_time``) over ``--repeat`` calls after a warm-up, zorro and sdpa
alternating call by call, with the median wall time beside it. The zorro model runs strict (a fallback raises), and
its logits are checked once against sdpa's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.cpu_costs import gemma3_mask

IMAGE_TOKEN = 255


def build_model(layers: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=256,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=64,
            layer_types=["full_attention"] * layers,
            max_position_embeddings=4096,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=4,
        ),
        mm_tokens_per_image=256,
        image_token_id=IMAGE_TOKEN,
        boi_token_id=253,
        eoi_token_id=254,
    )
    torch.manual_seed(0)
    sdpa = Gemma3ForConditionalGeneration(cfg).eval()
    sdpa.set_attn_implementation("sdpa")
    zorro = copy.deepcopy(sdpa)
    zorro.set_attn_implementation("zorro")
    return sdpa, zorro


def batch() -> dict:
    sizes = gemma3_mask().sample_sizes  # (2, 9): text, image, text, ..., text
    rows = []
    for row in sizes.tolist():
        ids = []
        for i, n in enumerate(row):
            ids += [IMAGE_TOKEN] * n if i % 2 else torch.randint(1, 250, (n,)).tolist()
        rows.append(ids)
    ids = torch.tensor(rows)
    return dict(
        input_ids=ids,
        token_type_ids=(ids == IMAGE_TOKEN).long(),
        pixel_values=torch.randn(8, 3, 64, 64),
        labels=ids.masked_fill(ids == IMAGE_TOKEN, -100),
    )


def timed(fn, repeat: int) -> tuple[list[float], list[float]]:
    cpu, wall = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return cpu, wall


def paired(fns: dict, repeat: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    runs = {k: ([], []) for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            c, w = timed(fn, 1)
            runs[k][0].extend(c)
            runs[k][1].extend(w)
    return {k: (min(c), statistics.median(w)) for k, (c, w) in runs.items()}


def report(title: str, times: dict) -> None:
    z = times["zorro"][0]
    cells = [
        f"{k} {c * 1e3:.1f} ms (wall {w * 1e3:.1f})" + ("" if k == "zorro" else f" {c / z:.2f}x")
        for k, (c, w) in times.items()
    ]
    print(f"{title:34s} " + " | ".join(cells))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    from zorro_kernels.integrations import _hf_layouts
    from zorro_kernels.integrations import transformers as zt

    zt.register(strict=True)
    sdpa, zorro = build_model(args.layers)
    inputs = batch()
    fwd_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        got, want = zorro(**fwd_inputs).logits, sdpa(**fwd_inputs).logits
    err = (got - want).abs().max().item()
    print(
        f"tiny Gemma 3: {args.layers} full-attention layers, H=8, D=64, B=2, N={inputs['input_ids'].shape[1]}, "
        f"{args.threads} thread(s); max |logits zorro - sdpa| = {err:.1e}"
    )

    blocks = get_block_sequence_ids_for_mask(inputs["token_type_ids"])
    embeds = torch.zeros(2, inputs["input_ids"].shape[1], 8)

    def masks(model):
        _hf_layouts._LAYOUTS.clear()  # the integration caches layouts across calls; measure the build
        return create_masks_for_vision_model(
            config=model.config.get_text_config(),
            inputs_embeds=embeds,
            attention_mask=None,
            cache=None,
            position_ids=None,
            block_sequence_ids=blocks,
        )

    report(
        "masks (create_masks_for_vision_model)", paired({"zorro": lambda: masks(zorro), "sdpa": lambda: masks(sdpa)}, 5)
    )

    def forward(model):
        with torch.no_grad():
            model(**fwd_inputs)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    report("model forward", paired({"zorro": lambda: forward(zorro), "sdpa": lambda: forward(sdpa)}, args.repeat))
    report(
        "model forward+backward",
        paired({"zorro": lambda: train_step(zorro), "sdpa": lambda: train_step(sdpa)}, args.repeat),
    )


if __name__ == "__main__":
    main()
