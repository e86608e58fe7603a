"""Which FFN neurons are active: the rule, the per-layer thresholds that set it, and the file that keeps them.

A neuron i is active for a token when its contribution score |h_i| * ||down[:, i]|| is above its layer's
threshold, h = act(gate x) * up x being the FFN's hidden activation. Threshold 0 means the exact rule of
ReLU-family models, h_i != 0: skipping the other neurons changes nothing. SiLU models have no natural zeros;
their thresholds are calibrated (tools/calibrate.py) and saved as JSON together with the fingerprint of the
model they were calibrated on, so that a config is never applied to another model.

`Sparsifier` is what the engine runs: it zeroes the inactive neurons of h before the down projection (a
kernel path skips their rows instead) and counts how many stayed active. The profiler uses its `mask`.
"""
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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .config import HotcoldError, ModelConfig, blk, first_line

if TYPE_CHECKING:
    import torch

EXACT_ACTS = ("relu", "fatrelu", "drelu")  # activations with natural zeros: h_i != 0 is exact
FINGERPRINT_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")  # layer 0's, hashed as stored
HASH_BYTES = 1 << 20  # per tensor, hashed whole up to this size; beyond, evenly spaced rows of about this size
CONFIG_KEYS = ("thresholds", "fingerprint")  # required in a sparsity JSON
LATER_KEYS = ("act_threshold", "rope")  # fingerprint keys that files written before them lack


def fingerprint(c: ModelConfig, tensors: dict) -> dict:
    """What identifies a model for profiles, splits and sparsity configs: its shape, activation (and threshold), rope
    and layer 0's FFN."""
    sha = hashlib.sha256()
    for name in FINGERPRINT_TENSORS:
        t = tensors.get(blk(0, name))
        if t is not None:
            sha.update(np.ascontiguousarray(t.data).data)
    return {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_ff": c.n_ff, "act": c.act, "act_threshold": c.act_threshold,
            "rope": rope_key(c), "ffn0_sha256": sha.hexdigest()[:16]}


def rope_key(c: ModelConfig) -> str:
    """The rope settings in one string: the same weights under another rope (Llama 3.1's factors, a linear scale)
    feed the FFNs other inputs, so their profiles, thresholds and predictors do not carry over."""
    freqs = ("none" if c.rope_freqs is None else
             hashlib.sha256(np.asarray(c.rope_freqs, np.float64).tobytes()).hexdigest()[:8])
    return f"base {float(c.rope_base)!r}, scale {float(c.rope_scale)!r}, freqs {freqs}"


def tensors_sha256(tensors: dict, names) -> str:
    """A sha256 of the named tensors as stored (name, type, shape, `sample_bytes`); names missing are skipped."""
    sha = hashlib.sha256()
    for name in names:
        t = tensors.get(name)
        if t is not None:
            sha.update(f"{name} {t.qtype.name} {tuple(t.shape)}".encode())
            sha.update(sample_bytes(t.data))
    return sha.hexdigest()[:16]


def sample_bytes(a: np.ndarray) -> bytes:
    """The raw bytes of a stored tensor, or of evenly spaced rows of it when it is bigger than HASH_BYTES."""
    a = np.ascontiguousarray(a)
    if a.nbytes <= HASH_BYTES or a.ndim < 2:
        return a.tobytes()
    n = max(1, HASH_BYTES * a.shape[0] // a.nbytes)  # rows to take
    return a[np.linspace(0, a.shape[0] - 1, n).round().astype(np.int64)].tobytes()


def weights_sha256(tensors: dict) -> str:
    """A sha256 of every tensor as stored (name, type, shape, `sample_bytes`): it tells apart models that `fingerprint`
    (layer 0's FFN) and a bundle's (the FFN) take for one, a fine-tune of attention alone say. Long jobs record it:
    a resume must continue on the same weights."""
    return tensors_sha256(tensors, sorted(tensors))


def check_fingerprint(found: dict, expected: dict, path: str, what: str) -> None:
    """Refuse `what` at `path` when it was made for another model, naming the first difference (keys added to
    fingerprints later, LATER_KEYS, are compared where the file has them)."""
    if not isinstance(found, dict):
        raise HotcoldError(f"{path}: not a {what} (its fingerprint is not a JSON object)")
    for k, v in expected.items():
        if found.get(k) != v and (k in found or k not in LATER_KEYS):
            raise HotcoldError(f"{path}: {what} of another model ({k} {found.get(k)!r}, this model has {v!r})")


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) then rename over `path`: readers see the old file or the new one, never half of one."""
    write_all([(path, write)])


def write_all(outputs: list[tuple[str, Callable[[str], None]]]) -> None:
    """Each write(tmp) to a temporary file beside its path (its folder made if missing); once all have succeeded, each
    renamed over its path. A failure while writing leaves every old file as it was and no temporary file behind, and
    names the path, not its tmp. The paths must differ."""
    blocked = next((path for path, _ in outputs if os.path.isdir(path)), None)
    if blocked is not None:  # before any write: export's model takes minutes
        raise HotcoldError(f"{blocked}: a directory is in the way of this output")
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
    """SIGINT and SIGTERM wait until the block is done (where the platform can hold them: POSIX)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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


def check_replaceable(path: str, what: str, is_kind: Callable[[str], bool]) -> None:
    """Refuse an output that exists and is not what the command writes (a model, a corpus, a profile's manifest
    given as -o by mistake): a re-run replaces only its own kind of file."""
    if os.path.isfile(path):
        try:
            ok = is_kind(path)
        except (HotcoldError, OSError, ValueError):
            ok = False
        if not ok:
            raise HotcoldError(f"{path}: exists and is not {what}; not replaced (remove it or choose another -o)")


def json_writer(obj) -> Callable[[str], None]:
    """write(tmp) of obj as indented JSON, for write_atomic and write_all."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
    return write


def write_json(path: str, obj) -> None:
    write_atomic(path, json_writer(obj))


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        raise HotcoldError(f"{path}: no such file") from None
    except OSError as e:
        raise HotcoldError(f"{path}: unreadable ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HotcoldError(f"{path}: not a {what} (invalid JSON: {e})") from None
    if not isinstance(obj, dict):
        raise HotcoldError(f"{path}: not a {what} (a JSON object expected)")
    return obj


@dataclass
class SparsityConfig:
    thresholds: list[float]  # per layer, on the contribution score; 0 = the exact rule h_i != 0
    fingerprint: dict  # of the model it belongs to (see `fingerprint`)
    method: str = "exact"  # how the thresholds were found: exact | quantile | cett | greedy
    cett: float | None = None  # mean CETT of the skipped neurons over the calibration tokens
    layer_sparsity: list[float] = field(default_factory=list)  # on the calibration tokens
    calibration: dict = field(default_factory=dict)  # corpus, tokens, target, measured perplexities

    @staticmethod
    def exact(c: ModelConfig, fp: dict) -> SparsityConfig:
        return SparsityConfig([0.0] * c.n_layer, fp)

    def save(self, path: str) -> None:
        write_json(path, asdict(self))

    @staticmethod
    def load(path: str, expected: dict) -> SparsityConfig:
        """Read a sparsity JSON and refuse it unless it was made for the model of fingerprint `expected`."""
        obj = read_json(path, "sparsity config")
        missing = [k for k in CONFIG_KEYS if k not in obj]
        if missing:
            raise HotcoldError(f"{path}: not a sparsity config (no {missing[0]!r})")
        known = set(SparsityConfig.__dataclass_fields__)
        return SparsityConfig(**{k: v for k, v in obj.items() if k in known}).check(expected, path)

    def check(self, expected: dict, where: str) -> SparsityConfig:
        """self, unless made for another model than fingerprint `expected` or its thresholds are not one finite
        number >= 0 a layer."""
        check_fingerprint(self.fingerprint, expected, where, "sparsity config")
        thr = self.thresholds
        if not isinstance(thr, (list, tuple)) or len(thr) != expected["n_layer"] or not all(
                isinstance(t, (int, float, np.floating)) and not isinstance(t, bool) and 0 <= t < np.inf for t in thr):
            raise HotcoldError(f"{where}: thresholds must be {expected['n_layer']} finite numbers >= 0")
        return self


def batched_net(net):
    """The TorchModel that runs batched forwards: the net itself, or the kernel engine's prefill."""
    return getattr(net, "torch", net)


def attach(net, sp: Sparsifier | None) -> None:
    """Threshold a model's FFN path with `sp` (None: dense): batched forwards, and the kernel engine's decode."""
    batched_net(net).sparsity = sp
    if hasattr(net, "select"):
        net.select = None if sp is None else KernelSelector(net, sp)


def down_rows(net, i: int) -> torch.Tensor:
    """Layer i's down projection of a TorchModel as one output row per neuron: (n_ff, n_embd)."""
    c = net.c
    if net.down_t:
        return net.rows(blk(i, "ffn_down_t"), 0, c.n_ff)
    return net.rows(blk(i, "ffn_down"), 0, c.n_embd).T


def down_norms(net) -> torch.Tensor:
    """||down[:, i]|| of every neuron of a TorchModel: (n_layer, n_ff)."""
    import torch
    return torch.stack([down_rows(net, i).norm(dim=1) for i in range(net.c.n_layer)])


def contribution(h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The score |h_i| * ||down[:, i]||: (T, n_ff) for h (T, n_ff) and norm (n_ff,)."""
    return h.abs() * norm


class Sparsifier:
    """Zeroes inactive neurons of h in the FFN path and counts the active ones per layer."""

    def __init__(self, thresholds: list[float], norms: torch.Tensor):
        import torch
        self.thresholds = [float(t) for t in thresholds]
        self.norms = norms  # (n_layer, n_ff)
        self.active = torch.zeros(len(thresholds), dtype=torch.float64)  # active neuron-token pairs per layer
        self.seen = torch.zeros(len(thresholds), dtype=torch.float64)  # all neuron-token pairs per layer

    def mask(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Active neurons of layer i: bool (T, n_ff) for h (T, n_ff)."""
        t = self.thresholds[i]
        return h != 0 if t <= 0 else contribution(h, self.norms[i]) > t

    def __call__(self, i: int, h: torch.Tensor) -> torch.Tensor:
        m = self.mask(i, h)  # (T, n_ff)
        self.active[i] += m.sum()
        self.seen[i] += m.numel()
        return h.masked_fill(~m, 0.0)

    def reset(self) -> None:
        self.active.zero_()
        self.seen.zero_()

    def layer_sparsity(self) -> list[float]:
        return (1 - self.active / self.seen.clamp(min=1)).tolist()

    def sparsity(self) -> float:
        """Inactive / all neurons, per layer averaged over tokens, then over layers (DESIGN.md: Metrics)."""
        return float(np.mean(self.layer_sparsity()))


def truth_rule(bundle, net) -> Sparsifier:
    """What "active" meant in the labels `bundle` was trained on, for auditing it on the TorchModel net: its sparsity
    config's thresholds, or h != 0 where it has none (for a SiLU model that is every neuron: refused)."""
    c, where = net.c, bundle.path or "predictor bundle"
    thr = bundle.sparsity.get("thresholds")
    if thr is None and c.act not in EXACT_ACTS:
        raise HotcoldError(f"{where}: trained without a sparsity config, and a {c.act} model has no natural zeros: "
                           "which neurons are active is not defined (train with --sparsity CONFIG)")
    thr = [0.0] * c.n_layer if thr is None else thr
    if len(thr) != c.n_layer:
        raise HotcoldError(f"{where}: its sparsity config has {len(thr)} thresholds for {c.n_layer} layers")
    return Sparsifier(thr, down_norms(net))


class KernelSelector:
    """The kernel engine's per-layer decode hook: active neuron ids of one token by the thresholds.

    It runs the gate and up rows once more to know h: exact, not fast. A predictor replaces it on the fast path."""

    def __init__(self, net, sp: Sparsifier):
        self.net, self.sp = net, sp
        self.g = np.zeros(net.c.n_ff, np.float32)  # scratch, allocated once
        self.u = np.zeros(net.c.n_ff, np.float32)

    def __call__(self, i: int, x: np.ndarray, xn: np.ndarray) -> np.ndarray:
        import torch

        from .kernels import matvec
        from .model import ffn_activation
        c, layer = self.net.c, self.net.layers[i]
        matvec(layer.up, xn, self.u)
        u = torch.from_numpy(self.u)[None]  # (1, n_ff)
        if layer.gate is None:
            h = ffn_activation(u, None, c.act, c.act_threshold)
        else:
            matvec(layer.gate, xn, self.g)
            h = ffn_activation(torch.from_numpy(self.g)[None], u, c.act, c.act_threshold)
        return np.flatnonzero(self.sp(i, h)[0].numpy()).astype(np.int32)
