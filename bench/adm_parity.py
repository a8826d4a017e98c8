"""Quick numerical check that performance changes to unet.py keep guided-diffusion parity.

Loads the reference ADM models in ../shared/reference (adm_tiny_a, adm_tiny_b: guided-diffusion flags, random weights,
a fixed input and the expected output of every decoder block), runs our U-Net on them and prints the largest absolute
error. The formal test lives in tests/; this is the 5-second check to run after touching unet.py.

    python bench/adm_parity.py [--reference-dir ../shared/reference] [--tol 1e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from diffseg.models.unet import UNet, unet_config_from_guided_flags  # noqa: E402


def check(ref_dir: Path, name: str, tol: float) -> bool:
    flags = json.loads((ref_dir / f"{name}.json").read_text())
    ref = torch.load(ref_dir / f"{name}.pt", weights_only=True)
    model = UNet(unet_config_from_guided_flags(flags)).eval()
    model.load_state_dict(ref["state_dict"], strict=True)  # keys and shapes must be guided-diffusion's
    dec = sorted((k for k in ref if k.startswith("output_blocks.")), key=lambda k: int(k.split(".")[1]))
    with torch.no_grad():
        names = [f"dec.{k.split('.')[1]}" for k in dec] + ["out"]
        got = model.features(ref["x"], ref["t"], names)
        full = model(ref["x"], ref["t"])
    errs = {k: (got[f"dec.{k.split('.')[1]}"] - ref[k]).abs().max().item() for k in dec}
    errs["out"] = (got["out"] - ref["out"]).abs().max().item()
    errs["forward"] = (full - ref["out"]).abs().max().item()
    worst = max(errs.values())
    ok = worst <= tol
    print(f"{name}: max |err| = {worst:.2e} over {len(errs)} tensors -> {'OK' if ok else 'FAIL'} (tol {tol:g})")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("DIFFSEG_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "reference"
    p.add_argument("--reference-dir", type=Path, default=default)
    p.add_argument("--tol", type=float, default=1e-5)
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.reference_dir.is_dir():
        print(f"skipped: no reference vectors at {args.reference_dir}")
        return 0
    results = [check(args.reference_dir, name, args.tol) for name in ("adm_tiny_a", "adm_tiny_b")]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
