"""Writing outputs without losing anything: atomic writes (a temporary file renamed over the output), a lock per output,
checks made before long work, and JSON read with one-line errors."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Callable

from .config import HotcoldError, first_line


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, never half of one."""
    write_all([(path, write)])


def refuse_directories(paths) -> None:
    """An output path where a directory stands is refused (before any work, and before asking for --force)."""
    blocked = next((path for path in paths if os.path.isdir(path)), None)
    if blocked is not None:
        raise HotcoldError(f"{blocked}: a directory is in the way of this output")


def write_all(outputs: list[tuple[str, Callable[[str], None]]], stale: list[str] = ()) -> None:
    """Each write(tmp) to a temporary file beside its path (its folder made if missing); once all have succeeded, each
    renamed over its path, and the `stale` files (which these outputs make obsolete) removed. A failure while writing
    leaves every old file as it was and no temporary file behind, and names the path, not its tmp. The paths must
    differ."""
    refuse_directories([p for p, _ in outputs] + list(stale))  # before any write: export's model takes minutes
    from safetensors import SafetensorError
    tmps = []
    try:
        for path, write in outputs:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            remove_stale_temporaries(path)
            tmps.append(f"{path}.tmp{os.getpid()}")
            try:
                write(tmps[-1])
            except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors: not OSErrors
                if isinstance(e, OSError) and e.filename not in (None, tmps[-1]):  # a file the writer reads
                    raise
                raise HotcoldError(f"{path}: cannot write ({write_failure(path, e)})") from None
        with signals_held():  # Ctrl-C or kill between two renames would leave new files beside old ones
            for (path, _), tmp in zip(outputs, tmps):
                os.replace(tmp, path)
            for path in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_failure(path: str, e: Exception) -> str:
    """Why a write failed, in a few words: the OS's reason, or a full disk where the writer's own error (torch's
    "unexpected pos", numpy's "8192 requested and 752 written") does not say so."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    with contextlib.suppress(OSError):
        if shutil.disk_usage(os.path.dirname(path) or ".").free < 1 << 20:
            return "No space left on device"
    return first_line(e)


@contextlib.contextmanager
def output_lock(path: str):
    """Hold a lock on the output `path` (a file, a prefix or a directory, there yet or not) while a command writes it:
    a second hotcold writing the same output is refused in one line instead of interleaving with the first. It is
    an flock on a file named after the absolute path, in the temporary directory: nothing is left beside the output,
    and the lock goes with the process however it ends. Where no lock file can be made (or flock is missing: not
    POSIX), nothing is locked."""
    if os.name != "posix":
        yield
        return
    import fcntl
    base = re.sub(r"(\.powerinfer)?\.gguf$|\.json$|\.gpuidx$", "", os.path.abspath(path))  # -o x, x.gguf: one
    folder = os.path.join(tempfile.gettempdir(), f"hotcold-locks-{os.getuid()}")
    name = hashlib.sha256(base.encode()).hexdigest()[:32]
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HotcoldError(f"{path}: another hotcold is writing this output now; wait for it to end") from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done: their handlers note them meanwhile, and a noted one is raised
    again after it. (A signal mask holds them for one thread only, and the kernel hands a process's signal to any
    thread that does not block it: torch's, numba's or tqdm's threads took them, and Python then ran the handler in
    the main thread inside the block.) Outside the main thread, where handlers cannot be set, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)


def remove_stale_temporaries(path: str) -> None:
    """The temporary files of `path` that a writer killed outright (SIGKILL, power loss) left: removed once their
    process is gone (the next write of the path, when a resumed job redoes it, finds them)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        pid = tmp[len(path) + 4:]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another writer
                os.remove(tmp)


def process_alive(pid: int) -> bool:
    if os.name != "posix":  # there os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # it does, as another user's
        return True


def exists_error(out: str, what: str = "already exists", resume_point: str | None = None) -> HotcoldError:
    """The refusal of an output that exists without --force; a resume point beside it is a stopped run with --force
    (killed before, or just after, it wrote the output), which --force resumes."""
    if resume_point is not None and os.path.exists(resume_point):
        return HotcoldError(f"{out}: {what}, with {resume_point} of a stopped run beside it (--force resumes that run "
                            "if it had these settings)")
    return HotcoldError(f"{out}: {what} (--force overwrites it)")


def check_writable(path: str) -> None:
    """Refuse, before any long work, an output that could not be written: path itself when it is a directory (a
    bundle), else its folder or, while that is missing, the nearest folder above it (nothing is made here: a command
    refused later leaves no empty folders)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.normpath(path)) or "."
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        raise HotcoldError(f"{folder}: exists and is not a directory")
    if not os.access(folder, os.W_OK):
        raise HotcoldError(f"{folder}: not writable (the output {path} goes there)")


def check_replaceable(path: str, what: str, is_kind: Callable[[str], bool], flag: str = "-o") -> None:
    """Refuse an output that exists and is not what the command writes (a model, a corpus, a profile's manifest
    given as -o by mistake): a re-run replaces only its own kind of file."""
    if os.path.isfile(path):
        try:
            ok = is_kind(path)
        except (HotcoldError, OSError, ValueError):
            ok = False
        if not ok:
            raise HotcoldError(f"{path}: exists and is not {what}; not replaced (remove it or choose another {flag})")


def json_writer(obj) -> Callable[[str], None]:
    """write(tmp) of obj as indented JSON, for write_atomic and write_all."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
    return write


def write_json(path: str, obj) -> None:
    write_atomic(path, json_writer(obj))


JSON_ERRORS = (ValueError, RecursionError)  # invalid JSON or UTF-8, numbers past 4300 digits, nesting past the stack


def error_text(e: BaseException) -> str:
    """An exception as one short line: its kind and message."""
    return f"{type(e).__name__}: {first_line(e)[:200]}"


def read_json_if(path: str, what: str) -> dict | None:
    """The JSON object in path, None when there is no such file."""
    return read_json(path, what) if os.path.exists(path) else None


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file as it is ("\r\n" kept, as llama.cpp reads bytes); one line naming it where it cannot be
    read, `what` saying what it was read as."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HotcoldError(f"{path}: unreadable {what} ({e})") from None


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file") from None
    except OSError as e:
        raise HotcoldError(f"{path}: unreadable ({e.strerror})") from None
    except JSON_ERRORS as e:
        raise HotcoldError(f"{path}: not a {what} (invalid JSON: {error_text(e)})") from None
    if not isinstance(obj, dict):
        raise HotcoldError(f"{path}: not a {what} (a JSON object expected)")
    return obj
