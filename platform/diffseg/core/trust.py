"""Trust for state that gets unpickled: a Ray Tune experiment folder, before `Tuner.restore` reads it.

Resuming a sweep unpickles files in its folder (`tuner.pkl`, the cloudpickled trials inside
`experiment_state-*.json`, the searcher's `*.pkl`, trials' `error.pkl`), so anyone who can write that folder could
run code in the driver. Two checks run before any of it is read (`check_state`), and a refusal leaves it unread:

1. **Ownership and permissions.** The folder, every folder on the way to a restored file, and the file itself are
   owned by this user and writable by nobody else; the folder holding the experiment is owned by this user or root
   and, if others may write it, has the sticky bit (as /tmp does), so they cannot swap the experiment out.
2. **A keyed hash.** When a sweep's driver stops (finished, interrupted or failed) it records an HMAC-SHA256 of the
   files Tune restores from (`DriverRun.sign`, in `<experiment>/.diffseg-state.sig`), under a per-user key kept
   OUTSIDE the sweep folder (`$DIFFSEG_STATE_KEY`, else `$XDG_CONFIG_HOME/diffseg/state.key`, else
   `~/.config/diffseg/state.key`; created on first use, mode 0600). Restore recomputes it. A folder another user
   wrote, a copy from a shared bucket, or any file added or changed since the driver stopped is refused, including on
   file systems where ownership means little (FUSE mounts of buckets, shared NFS users).

   The driver signs only what it can show this run wrote: files that did not exist when the run began or whose
   content changed during it, and of those only Tune's own names (`tuner.pkl`, our `sweep.json`, Tune's
   `experiment_state-<session>.json`, searcher and variant-generator state of the ONE session stamp this run began
   in, and `params.pkl` / `error.pkl` in trial folders), plus, on a resume, the files the check at its start
   verified. A state file planted before the run (Tune restores the experiment state whose name sorts last, so a
   planted `experiment_state-2099-...json` would win) or during it, with a foreign stamp, is left out, and a resume
   is then refused because the folder holds a file the signature does not cover. A fresh sweep into a folder that
   already holds such files does not start (`check_fresh`).

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
import re
import secrets
import stat
import time
from datetime import datetime
from pathlib import Path

from diffseg.core.config import UserError, atomic_write_text

KEY_ENV = "DIFFSEG_STATE_KEY"
SIGNATURE_NAME = ".diffseg-state.sig"
SIGNATURE_FORMAT = "diffseg-state-hmac/1"
log = logging.getLogger(__name__)


class UntrustedState(UserError, RuntimeError):
    """A folder whose pickled state is not provably this user's; nothing in it was read (a job ends with the
    message in one line: what to check, and how to vouch for the folder if it is yours)."""


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


def sign_state(folder: str | os.PathLike, files: dict[str, str] | None = None) -> Path:
    """Record the keyed hash of `files` ({relative path: SHA-256}; default: every restorable file of the folder, as
    the explicit vouch `trust_state` does). A sweep's driver signs through `DriverRun`, which passes only what it
    wrote."""
    folder = Path(folder)
    files = _digests(folder) if files is None else dict(files)
    sig = {"format": SIGNATURE_FORMAT, "files": files, "hmac": _mac(load_key(), files)}
    path = folder / SIGNATURE_NAME
    atomic_write_text(path, json.dumps(sig, indent=1, sort_keys=True))
    return path


# Tune's per-session state files at the top of the experiment folder: the session stamp is the second the run's
# controller started (`TuneController._session_str`, local time), shared by all the files of one run.
SESSION_FILE = re.compile(
    r"(experiment_state|basic-variant-state|search_gen_state|searcher-state|callback-states)"
    r"-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(json|pkl)"
)
TOP_LEVEL_NAMES = ("tuner.pkl", "sweep.json")  # the other restorable files a run writes at the top
TRIAL_NAMES = ("params.pkl", "error.pkl")  # what Tune pickles into a trial's folder (<experiment>/<trial>/)


def session_time(name: str) -> float | None:
    """The start time (epoch seconds) a Tune session file's name carries, or None for any other name."""
    m = SESSION_FILE.fullmatch(name)
    if not m:
        return None
    return datetime.strptime(m.group(2), "%Y-%m-%d_%H-%M-%S").timestamp()


def check_fresh(folder: str | os.PathLike, keep: tuple[str, ...] = ()) -> None:
    """Refuse to start a NEW sweep in a folder that already holds files Tune would restore on a later resume: the
    driver does not sign them, so they would only make that resume fail, and they cannot be this sweep's. `keep`:
    names the caller rewrites itself (the driver's own `sweep.json`)."""
    folder = Path(folder)
    found = [p.relative_to(folder).as_posix() for p in restored_files(folder)] if folder.is_dir() else []
    found = [name for name in found if name not in keep]
    if found:
        raise UntrustedState(
            f"{folder}: a new sweep does not start in a folder that already holds state files Tune restores from "
            f"({found[:5]}{' ...' if len(found) > 5 else ''}): this sweep did not write them, and a resume would "
            "unpickle them. Remove them (or the folder) if they are yours and unwanted, or choose another name"
        )


class DriverRun:
    """One run of a sweep driver over its experiment folder: what was there when it began (`trusted`: the digests
    the resume check verified), and, when it stops, the signature of only what it wrote (see the module docstring).

        run = DriverRun(exp_dir, trusted=check_state(exp_dir) if resuming else {}, own=("sweep.json",))
        ...   # Tune runs
        run.sign()
    """

    def __init__(
        self, folder: str | os.PathLike, trusted: dict[str, str] | None = None, own: tuple[str, ...] = ()
    ):  # fmt: skip
        self.folder = Path(folder)
        self.trusted = dict(trusted or {})
        self.own = own  # files the driver itself writes during the run (signed as they are when it stops)
        self.before = _digests(self.folder) if self.folder.is_dir() else {}
        self.started = time.time()

    def written(self) -> tuple[dict[str, str], list[str]]:
        """({relative path: SHA-256} this run may sign, [restorable files it leaves out])."""
        now = time.time()
        actual = _digests(self.folder)
        sign: dict[str, str] = {}
        new = {name: d for name, d in actual.items() if self.before.get(name) != d}
        for name, digest in actual.items():
            if (name not in new and self.trusted.get(name) == digest) or name in self.own:
                sign[name] = digest  # there before, verified by the resume check, unchanged; or the driver's own
        stamps = {}
        for name in new:
            t = session_time(name)
            if "/" not in name and t is not None and self.started - 2 <= t <= now + 1:
                stamps.setdefault(t, []).append(name)
        # one session per run: two stamps in the window mean one of them was planted, so neither is signed
        ours = next(iter(stamps.values())) if len(stamps) == 1 else []
        for name, digest in new.items():
            depth, base = name.count("/"), name.rsplit("/", 1)[-1]  # a trial's files sit in its folder, one down
            if (depth == 0 and (name in TOP_LEVEL_NAMES or name in ours)) or (depth == 1 and base in TRIAL_NAMES):
                sign[name] = digest
        return sign, sorted(set(actual) - set(sign))

    def sign(self) -> Path:
        files, left_out = self.written()
        if left_out:
            log.warning(
                "%s: not signing %s: files this sweep's driver did not write in this run (there before it, with "
                "another session's stamp, or not Tune's); a resume will be refused while they are there",
                self.folder, left_out[:5],
            )  # fmt: skip
        return sign_state(self.folder, files)


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


def check_state(folder: str | os.PathLike) -> dict[str, str]:
    """Raise UntrustedState unless the folder's restorable state is provably this user's (permissions and keyed
    hash); nothing in the folder is deserialised here. Returns the verified {relative path: SHA-256}."""
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
            raise UntrustedState(
                f"{folder}: {added[:5]} are not covered by the signature (they appeared after it, or were there "
                "before the driver that signed it ran, or are not Tune's, so it left them out)"
            )
        gone = sorted(set(files) - set(actual))
        if gone:
            raise UntrustedState(f"{folder}: {gone[:5]} were signed but are missing")
        changed = sorted(name for name in files if actual[name] != files[name])
        if changed:
            raise UntrustedState(f"{folder}: {changed[:5]} changed after the state was signed")
    except UntrustedState as e:
        raise UntrustedState(f"refusing to restore the sweep (it would unpickle code from it): {e}. {how}") from None
    return actual


def recheck_state(
    folder: str | os.PathLike, restoring: bool, trusted: dict[str, str], own: tuple[str, ...] = ()
) -> None:
    """The check again, just before Tune reads the folder (after Ray's seconds of start-up): the permissions, and a
    restore finds exactly the files `check_state` verified (`trusted`), a new sweep no restorable state at all; `own`
    names the files the driver itself rewrote since (its `sweep.json`). Anything else appeared or changed in between:
    refused, before Tune unpickles anything."""
    folder = Path(folder)
    check_permissions(folder)
    now = {k: v for k, v in _digests(folder).items() if k not in own}
    before = {k: v for k, v in trusted.items() if k not in own} if restoring else {}
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        raise UntrustedState(
            f"{folder}: {changed[:5]} appeared or changed while the sweep was starting (another user, or another "
            "process, writes there); refused before anything was read"
        )


def trust_state(folder: str | os.PathLike) -> list[str]:
    """The explicit "I vouch for this folder": the permission checks, then `sign_state`. Returns what was signed."""
    check_permissions(folder)
    sign_state(folder)
    return sorted(_digests(Path(folder)))
