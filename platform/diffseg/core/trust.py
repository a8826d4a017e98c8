"""Trust for state that gets unpickled: a Ray Tune experiment folder, before `Tuner.restore` reads it.

Resuming a sweep unpickles files in its folder (`tuner.pkl`, the cloudpickled trials inside
`experiment_state-*.json`, the searcher's `*.pkl`, trials' `error.pkl`), so anyone who can write that folder could
run code in the driver. Two checks run before any of it is read (`check_state`), and a refusal leaves it unread:

1. **Ownership and permissions.** The folder, every folder on the way to a restored file, and the file itself are
   owned by this user and writable by nobody else; the folder holding the experiment is owned by this user or root
   and, if others may write it, has the sticky bit (as /tmp does), so they cannot swap the experiment out.
2. **A keyed hash.** When a sweep's driver stops (finished, interrupted or failed) it records an HMAC-SHA256 of every
   file Tune restores from (`sign_state`, in `<experiment>/.diffseg-state.sig`), under a per-user key kept OUTSIDE
   the sweep folder (`$DIFFSEG_STATE_KEY`, else `$XDG_CONFIG_HOME/diffseg/state.key`, else
   `~/.config/diffseg/state.key`; created on first use, mode 0600). Restore recomputes it. A folder another user
   wrote, a copy from a shared bucket, or any file added or changed since the driver stopped is refused, including on
   file systems where ownership means little (FUSE mounts of buckets, shared NFS users).

A driver killed with SIGKILL cannot sign what it wrote last; `python jobs/sweep.py --config S.yaml --trust-state`
(`trust_state`) signs the folder as it is, for a user who knows nobody else could have written it.

Trust is in the key file: anyone who can read it can sign folders as this user. Keep it private (it is 0600 in a
0700 folder); a replayed older signed state of the same user's own sweep is not detected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path

from diffseg.core.config import atomic_write_text

KEY_ENV = "DIFFSEG_STATE_KEY"
SIGNATURE_NAME = ".diffseg-state.sig"
SIGNATURE_FORMAT = "diffseg-state-hmac/1"
log = logging.getLogger(__name__)


class UntrustedState(RuntimeError):
    """A folder whose pickled state is not provably this user's; nothing in it was read."""


# ---------------------------------------------------------------------------------------------------- key
def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "diffseg" / "state.key"


def load_key(create: bool = True) -> bytes:
    """This user's state key (32 random bytes), created 0600 in a 0700 folder on first use; refused if others can
    read or write it, or if it is not this user's."""
    path = key_path()
    if not path.exists():
        if not create:
            raise UntrustedState(f"{path}: no state key (nothing was ever signed by this user on this machine)")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            log.info("created the state key %s (mode 0600): it signs sweep folders as yours", path)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UntrustedState(f"{path}: the state key belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        raise UntrustedState(
            f"{path}: the state key is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}` (and check who may have read it)"
        )
    key = path.read_bytes()
    if len(key) < 32:
        raise UntrustedState(f"{path}: the state key is shorter than 32 bytes; delete it to make a new one")
    return key


# ---------------------------------------------------------------------------------------------------- state
def restored_files(folder: str | os.PathLike) -> list[Path]:
    """The files `Tuner.restore` may deserialise: every `*.pkl` at any depth, and the `*.json` at the top (the
    experiment state holds cloudpickled trials; searcher and variant-generator state; our `sweep.json`)."""
    folder = Path(folder)
    files = set(folder.rglob("*.pkl")) | set(folder.glob("*.json"))
    return sorted(p for p in files if p.is_file() or p.is_symlink())


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in restored_files(folder):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[p.relative_to(folder).as_posix()] = h.hexdigest()
    return out


def _mac(key: bytes, files: dict[str, str]) -> str:
    blob = json.dumps({"format": SIGNATURE_FORMAT, "files": files}, sort_keys=True).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


def sign_state(folder: str | os.PathLike) -> Path:
    """Record the keyed hash of the folder's restorable files (see the module docstring)."""
    folder = Path(folder)
    files = _digests(folder)
    sig = {"format": SIGNATURE_FORMAT, "files": files, "hmac": _mac(load_key(), files)}
    path = folder / SIGNATURE_NAME
    atomic_write_text(path, json.dumps(sig, indent=1, sort_keys=True))
    return path


def _check_owned(path: Path, what: str) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise UntrustedState(f"{path}: {what} is a symbolic link; refused")
    if st.st_uid != os.getuid():
        raise UntrustedState(f"{path}: {what} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedState(
            f"{path}: {what} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"`chmod go-w` it if nobody else did write it"
        )


def check_permissions(folder: str | os.PathLike) -> None:
    """Ownership and write permissions of the experiment folder and of everything Tune restores from it."""
    folder = Path(folder)
    parent = folder.resolve().parent
    st = parent.stat()
    if st.st_uid not in (os.getuid(), 0):
        raise UntrustedState(f"{parent}: the folder holding the sweep belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UntrustedState(
            f"{parent}: others may write the folder holding the sweep (mode {stat.S_IMODE(st.st_mode):o}, no "
            "sticky bit), so they could replace the sweep folder"
        )
    _check_owned(folder, "the sweep folder")
    seen: set[Path] = {folder}
    for p in restored_files(folder):
        for d in reversed(p.relative_to(folder).parents[:-1]):
            if folder / d not in seen:
                _check_owned(folder / d, "a folder of the sweep")
                seen.add(folder / d)
        _check_owned(p, "a file Tune restores from")


def check_state(folder: str | os.PathLike) -> None:
    """Raise UntrustedState unless the folder's restorable state is provably this user's (permissions and keyed
    hash); nothing in the folder is deserialised here."""
    folder = Path(folder)
    how = (
        f"If you wrote {folder} and nobody else can have changed it, `python jobs/sweep.py --config <sweep.yaml> "
        "--trust-state` records its present state under your key; then resume."
    )
    try:
        check_permissions(folder)
        sig_path = folder / SIGNATURE_NAME
        if not sig_path.is_file():
            raise UntrustedState(
                f"{folder}: the sweep state is not signed ({SIGNATURE_NAME} missing): it was not written by a "
                "sweep driver of this user that stopped cleanly"
            )
        _check_owned(sig_path, "the state signature")
        try:
            sig = json.loads(sig_path.read_text())
            files, mac = dict(sig["files"]), str(sig["hmac"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UntrustedState(f"{sig_path}: unreadable state signature ({e})") from None
        if not hmac.compare_digest(_mac(load_key(create=False), files), mac):
            raise UntrustedState(f"{sig_path}: the signature was not made with your state key ({key_path()})")
        actual = _digests(folder)
        added = sorted(set(actual) - set(files))
        if added:
            raise UntrustedState(f"{folder}: {added[:5]} appeared after the state was signed")
        gone = sorted(set(files) - set(actual))
        if gone:
            raise UntrustedState(f"{folder}: {gone[:5]} were signed but are missing")
        changed = sorted(name for name in files if actual[name] != files[name])
        if changed:
            raise UntrustedState(f"{folder}: {changed[:5]} changed after the state was signed")
    except UntrustedState as e:
        raise UntrustedState(f"refusing to restore the sweep (it would unpickle code from it): {e}. {how}") from None


def trust_state(folder: str | os.PathLike) -> list[str]:
    """The explicit "I vouch for this folder": the permission checks, then `sign_state`. Returns what was signed."""
    check_permissions(folder)
    sign_state(folder)
    return sorted(_digests(Path(folder)))
