"""Payload files: the integrity record (a SHA-256 of every tensor and of the rest), atomic writes, checked reads.

Every file we write as a payload (checkpoints, pixel-segmenter bundles, sweep ensembles) goes through `write_payload` /
`read_payload`: the payload carries a SHA-256 of every tensor (of its dtype, shape and raw bytes, so any dtype works:
fp32, bf16, fp16, int) and one of everything else (config, step, extra), and loading recomputes them:

    {"format": ..., ..., "integrity": {"algorithm": "sha256", "tensors": {"model/<key>": hex, ...}, "meta": hex}}

A flipped bit is an error that names the file and the tensor, never a model that silently serves wrong weights. A file
without the record is refused too, everywhere (jobs, Serve, pyfunc models, `init_from`, feature backbones), unless the
caller opts out by name: `allow_unverified=True`, or `--allow-unverified` / `DIFFSEG_ALLOW_UNVERIFIED=1` for a whole
job; `jobs/convert_checkpoint.py src=<old> dst=<new> allow_unverified=true` re-seals an old file once
(`describe_payload`, `reseal_payload`). Every load error is a `CheckpointError` naming the real file and what is wrong
with it: empty, truncated, pickled code, not ours, the wrong kind of file (`KINDS`), or damaged.

Writes are atomic (`diffseg.core.config.atomic_write`: a temp file beside the target, fsync, one rename), so a killed
writer never leaves a torn file, nor a temp file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffseg.core.config import UserError, atomic_write
from diffseg.core.runtime import ALLOW_UNVERIFIED_ENV, unverified_allowed  # noqa: F401 (re-exported)

FORMAT = "diffseg/1"
INTEGRITY_KEY = "integrity"
log = logging.getLogger(__name__)

# What each of our file formats is, for errors that say "this is a <kind>, not a <kind>".
KINDS = {
    FORMAT: "a diffseg model checkpoint (diffseg.models.checkpoint.load_checkpoint)",
    "diffseg-pixel-segmenter/1": "a pixel-segmenter bundle (diffseg.methods.pixel.PixelSegmenter.load)",
    "diffseg-ensemble-state/1": "a sweep trial's ensemble state (diffseg.experiments.sweep)",
}


class CheckpointError(UserError):
    """A file that cannot be loaded as the kind of file asked for; the message names the file and what is wrong."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (any dtype: the bytes are read as uint8)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}/{i}" if prefix else str(i))


def _skeleton(obj: Any) -> Any:
    """The payload without tensor data, in a canonical JSON-able form (dict keys of any type, sorted)."""
    if torch.is_tensor(obj):
        return "<tensor>"
    if isinstance(obj, dict):
        return [[repr(k), _skeleton(v)] for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0]))]
    if isinstance(obj, (list, tuple)):
        return [_skeleton(v) for v in obj]
    return repr(obj) if isinstance(obj, float) else obj


def payload_integrity(payload: dict[str, Any]) -> dict[str, Any]:
    """{"algorithm": "sha256", "tensors": {path: digest}, "meta": digest of everything that is not tensor data}."""
    body = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    meta = json.dumps(_skeleton(body), sort_keys=True, default=repr).encode()
    return {
        "algorithm": "sha256",
        "tensors": {name: tensor_digest(t) for name, t in _walk(body, "")},
        "meta": hashlib.sha256(meta).hexdigest(),
    }


def verify_integrity(payload: dict[str, Any], where: str) -> None:
    """Raise CheckpointError naming `where` and the first tensor whose bytes do not match the stored SHA-256."""
    stored = payload.get(INTEGRITY_KEY)
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
        raise CheckpointError(f"{where}: the file's integrity record is missing or unreadable")
    actual = payload_integrity(payload)
    expected = stored.get("tensors") or {}
    for name, digest in actual["tensors"].items():
        if name not in expected:
            raise CheckpointError(f"{where}: tensor {name!r} is not in the file's integrity record (altered file)")
        if digest != expected[name]:
            raise CheckpointError(
                f"{where}: tensor {name!r} does not match its SHA-256: the file is damaged or was altered"
            )
    missing = sorted(set(expected) - set(actual["tensors"]))
    if missing:
        raise CheckpointError(f"{where}: tensor(s) {missing[:5]} listed in the integrity record are missing")
    if actual["meta"] != stored.get("meta"):
        raise CheckpointError(
            f"{where}: the non-tensor part (format, config, step, extra) does not match its SHA-256: "
            "the file is damaged or was altered"
        )


def write_payload(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save a dict of tensors and plain data atomically, with its integrity record (see the module docstring)."""
    if "format" not in payload:
        raise ValueError("a payload needs a 'format' key")
    body = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    body[INTEGRITY_KEY] = payload_integrity(body)
    return atomic_torch_save(body, path)


def _describe(fmt: Any) -> str:
    return KINDS.get(fmt, f"a file of format {fmt!r}") if fmt is not None else "a file with no 'format' key"


def load_torch_file(path: str | os.PathLike, where: str | None = None, what: str = "a torch file", mmap: bool = False):
    """`torch.load(weights_only=True)` of a file, with every way it can fail said in one line naming the file
    (`where`, default the path): no file (FileNotFoundError), empty, not a torch zip file, truncated, damaged, or
    holding pickled objects that loading would run (CheckpointError; never torch's advice to load it unsafely)."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{where}: empty file (0 bytes): not {what}; was its write interrupted?")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{where}: not {what}: not a torch zip file (starts with {head!r}, {size} bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{where}: truncated or damaged: the end of the zip archive is missing ({size} bytes); "
            "was its write interrupted or its copy cut short?"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{where}: holds pickled Python objects other than tensors and plain data; refused, because "
                "loading it would run code from the file"
            ) from None
        raise CheckpointError(f"{where}: damaged: torch cannot read it ({type(e).__name__}: {msg[:200]})") from e


def read_payload(
    path: str | os.PathLike,
    expected: str,
    *,
    source: str | None = None,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """Load a payload written by `write_payload` (weights_only: no pickled code runs), check that its format is
    `expected` and that every tensor matches its SHA-256. Errors are CheckpointError (FileNotFoundError for no file)
    and name `source` (the file as the user knows it, e.g. a URI that was downloaded to `path`) or `path`.

    A file without its integrity record (written before checksums existed, or with the record removed or renamed) is
    refused: whoever could edit its weights could also drop the record. Loading one anyway is a deliberate, named
    choice (`allow_unverified=True`, or `unverified_allowed`'s process-wide opt-out), logged as a warning; re-seal
    such a file once with `jobs/convert_checkpoint.py src=<old> dst=<new> allow_unverified=true`. A record that does
    not match is refused always.
    """
    path = Path(path)
    where = source or str(path)
    payload = load_torch_file(path, where, _describe(expected))
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != expected:
        hint = " (guided-diffusion files: diffseg.models.guided.import_guided_diffusion)" if fmt is None else ""
        raise CheckpointError(f"{where}: this is {_describe(fmt)}, not {_describe(expected)}{hint}")
    if INTEGRITY_KEY in payload:
        verify_integrity(payload, where)
    elif not unverified_allowed(allow_unverified):
        raise CheckpointError(
            f"{where}: has no integrity record (the SHA-256 of its tensors; keys {sorted(map(str, payload))}), so "
            "nothing shows its weights are the ones written; refused. If you know where this file comes from (one "
            "written before checksums existed), re-seal it once: python jobs/convert_checkpoint.py "
            f"src={where} dst=<new file> allow_unverified=true (or load it unverified with --allow-unverified, "
            f"{ALLOW_UNVERIFIED_ENV}=1)"
        )
    else:
        log.warning("%s: loaded WITHOUT an integrity check (allow_unverified): nothing shows its weights are the "
                    "ones written; re-seal it with jobs/convert_checkpoint.py", where)  # fmt: skip
    return payload


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file (streamed), to compare with what its publisher says it is."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_payload(payload: dict[str, Any], path: str | os.PathLike) -> str:
    """What a payload file holds, in one line, for a person deciding whether to trust it (see `reseal_payload`)."""
    tensors = list(_walk({k: v for k, v in payload.items() if k != INTEGRITY_KEY}, ""))
    values = sum(t.numel() for _, t in tensors)
    parts = [_describe(payload.get("format")), f"{len(tensors)} tensors ({values:,} values)"]
    if "step" in payload:
        parts.append(f"step {payload['step']}")
    try:
        model = json.loads(payload["config"]).get("model", {})
        parts.append(f"model {model.get('kind')} at {model.get('unet', {}).get('image_size')} px")
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    for key in ("ema", "optimizer"):
        if key in payload:
            parts.append(f"{key} {'yes' if payload[key] is not None else 'no'}")
    if isinstance(payload.get("extra"), dict):
        parts.append(f"extra keys {sorted(payload['extra'])}")
    parts.append("integrity record " + ("present" if INTEGRITY_KEY in payload else "MISSING"))
    parts.append(f"file SHA-256 {file_sha256(path)}")
    return "; ".join(parts)


def reseal_payload(src: str | os.PathLike, dst: str | os.PathLike, expected: str) -> tuple[Path, str]:
    """Re-seal a payload file written before checksums existed (or whose record was lost): read it WITHOUT the
    integrity check (the caller vouches for it, having seen `describe_payload`), then write it to `dst` with a fresh
    record, and read that back verified. Returns (dst, the description of src). A file whose record is present but
    does not match is refused as always: re-sealing is for missing records, not for damage."""
    payload = read_payload(src, expected, allow_unverified=True)
    what = describe_payload(payload, src)
    out = write_payload(dst, payload)
    read_payload(out, expected)
    return out, what


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
