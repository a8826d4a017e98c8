"""What circular padding costs: a full train step (forward, DDPM loss, backward, AdamW, EMA: `loop.train_step`) of a
recipe with circular padding over the same recipe with zero padding, on the same machine, interleaved.

    circular            the recipe as it ships (every 3x3 conv pads through `models.unet.circular_pad`; on a CPU the
                        network computes in channels_last, `UNetTrunk.circular_channels_last`)
    circular-reference  the same network through nn.Conv2d's own circular padding (F.pad per conv) in the input's
                        memory format: what it cost before `circular_pad` (the "before" figure)
    zeros               the recipe with model.unet.padding_mode=zeros (no other change)

`--channels-last` adds the three again with loop.channels_last=on (the whole state in NHWC, as on CUDA).
Every variant is built by the training code from the config (`build_train_state`), initialised from the same seed
and fed the same random batch, so all that differs is the padding (and the memory format).

    python bench/circular_padding.py --threads 1                       # the K=3 recipe, batch 16, one CPU thread
    python bench/circular_padding.py --threads 1 --channels-last --repeats 9
    python bench/circular_padding.py --config jobs/configs/factorized_horse32_crm.yaml --batch-size 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import add_common_args, command_line, machine_line, setup, time_interleaved

from diffseg.core.config import load_config
from diffseg.models.unet import Conv2d
from diffseg.training.config import TrainConfig
from diffseg.training.loop import build_train_state, train_step

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--config", default=str(ROOT / "jobs/configs/factorized_horse32_crm_k3.yaml"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels-last", action="store_true", help="also time every variant in channels_last")
    p.set_defaults(iters=1, repeats=7)
    return p.parse_args(argv)


def make_step(config: str, padding: str, reference: bool, channels_last: bool, batch_size: int, device, seed: int):
    overrides = [
        f"optim.batch_size={batch_size}",
        f"model.unet.padding_mode={padding}",
        f"loop.channels_last='{'on' if channels_last else 'off'}'",  # quoted: YAML reads on/off as booleans
    ]
    cfg = load_config(TrainConfig, config, overrides)
    state, _ = build_train_state(cfg, device)
    if reference:
        state.model.circular_channels_last = False  # the input's memory format, as before
        for m in state.model.modules():
            if isinstance(m, Conv2d):
                m.reference_padding = True
    gen = torch.Generator(device).manual_seed(seed)
    size = cfg.model.unet.image_size
    batch = {"image": torch.randn(batch_size, 3, size, size, generator=gen, device=device)}
    return (lambda: train_step(state, batch, gen)), cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    device, _ = setup(args)
    variants = {"circular": ("circular", False), "circular-reference": ("circular", True), "zeros": ("zeros", False)}
    formats = [False, True] if args.channels_last else [False]
    steps, cfg = {}, None
    for cl in formats:
        for name, (padding, reference) in variants.items():
            key = name + ("-nhwc" if cl else "")
            steps[key], cfg = make_step(args.config, padding, reference, cl, args.batch_size, device, args.seed)
    secs = time_interleaved(steps, device, args.warmup, args.repeats, args.iters)
    print(machine_line(device))
    print(command_line())
    m = cfg.model
    print(
        f"# train step of {Path(args.config).name}: {m.kind}, K={m.factorized.num_components}, "
        f"C={m.unet.model_channels}, {m.unet.image_size} px, batch {args.batch_size}; "
        f"median of {args.repeats} interleaved rounds of {args.iters}"
    )
    print(f"{'variant':<24} {'ms/step':>8} {'cpu ms/step':>11}")
    for key, t in secs.items():
        print(f"{key:<24} {1e3 * t['wall']:>8.1f} {1e3 * t['cpu']:>11.1f}")
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    for suffix in ["-nhwc" if cl else "" for cl in formats]:
        for clock in clocks:
            z = secs["zeros" + suffix][clock]
            print(
                f"ratio circular{suffix}/zeros{suffix} ({clock}) = {secs['circular' + suffix][clock] / z:.3f}   "
                f"(before, nn.Conv2d's circular padding: {secs['circular-reference' + suffix][clock] / z:.3f})"
            )


if __name__ == "__main__":
    main()
