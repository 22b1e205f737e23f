"""Weights files: safetensors tensors plus nervedet metadata (config, training summary, metrics), never pickle.

A weights file carries everything needed to rebuild and feed its network: the model config (architecture,
classes, analysis mpp, normalisation) as JSON in the safetensors metadata, next to a summary of the training
data and the validation metrics. Loading checks the file's bytes before safetensors sees them and refuses
anything that is not a nervedet safetensors file with one line naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import nervedet
from nervedet._version import __version__
from nervedet.atomic import atomic_path
from nervedet.model import ConfigError, ModelConfig, build_network

log = logging.getLogger(__name__)

FORMAT = "nervedet-weights"
FORMAT_VERSION = "1"
BUNDLED_NAME = "nervedet-default.safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


class WeightsError(ValueError):
    """A weights file (or device) that cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded network (eval mode, on its device) with the config it must be fed with."""

    network: torch.nn.Module
    config: ModelConfig
    metadata: dict[str, Any]  # training, metrics, nervedet_version, created, format_version
    path: Path
    sha256: str

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device


def cpu_bf16_supported() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it, bf16 autocast is
    emulated and several times slower than float32 (seen here: 5-7x on an AVX2-only EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_threads(processes: int) -> int | None:
    """Split this machine's CPU cores between ``processes`` processes that run torch side by side (2 processes
    on 2 cores get one thread each instead of oversubscribing): the thread count set, or None for one process."""
    if processes <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // processes)
    torch.set_num_threads(threads)
    return threads


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N" or a torch.device."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise WeightsError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightsError(f"device {device!r} asked for but CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise WeightsError(f"device {device!r} does not exist ({count} CUDA device(s))")
    elif dev.type != "cpu":
        raise WeightsError(f"device {device!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (Path, datetime)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_weights(path: str | Path, network: torch.nn.Module, config: ModelConfig, *,
                 training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the network's state dict and metadata as safetensors, atomically (temp file + os.replace).

    ``dtype`` float16 halves the file (floating tensors only; they load back as float32).
    """
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise WeightsError(f"{path}: dtype {dtype} is not supported (float32, float16 or bfloat16)")
    path = Path(path)
    tensors = {name: t.detach().to("cpu", dtype=dtype if t.is_floating_point() else t.dtype)
               .clone(memory_format=torch.contiguous_format) for name, t in network.state_dict().items()}
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "training": json.dumps(training or {}, default=_jsonable),
        "metrics": json.dumps(metrics or {}, default=_jsonable),
        "nervedet_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with atomic_path(path) as tmp:  # a weights file is for everyone: 0644
            save_file(tensors, str(tmp), metadata=metadata)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise WeightsError(f"{path}: cannot write weights ({exc.strerror or exc})") from None
    log.info("wrote %s (%d tensors, %s, %.1f MB)", path, len(tensors), str(dtype).replace("torch.", ""),
             path.stat().st_size / 1e6)
    return path


def bundled_weights_candidates() -> list[Path]:
    """Where the bundled default weights may be: inside the installed package, then the repository's weights/."""
    package_file = Path(nervedet.__file__)
    return [package_file.parent / "weights" / BUNDLED_NAME,
            package_file.resolve().parents[1] / "weights" / BUNDLED_NAME]


def default_weights_path() -> Path:
    """The bundled default weights file, or a WeightsError that says how to make it."""
    candidates = bundled_weights_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise WeightsError(f"the bundled weights {BUNDLED_NAME} are not there (looked in "
                       f"{', '.join(str(c.parent) for c in candidates)}); train them with "
                       f"`python scripts/train_default.py` or pass a weights file")


def _parse(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors JSON header and its metadata, checked before safetensors reads the tensors."""
    if len(data) >= 9:
        (n,) = struct.unpack("<Q", data[:8])
        if n <= min(len(data) - 8, _MAX_HEADER) and data[8:9] == b"{":
            try:
                header = json.loads(data[8:8 + n])
            except (UnicodeDecodeError, ValueError):
                raise WeightsError(f"{path}: corrupt safetensors file (unreadable header)") from None
            if not isinstance(header, dict):
                raise WeightsError(f"{path}: corrupt safetensors file (header is not a mapping)")
            meta = header.get("__metadata__") or {}
            return header, meta if isinstance(meta, dict) else {}
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise WeightsError(f"{path}: is a pickle/PyTorch checkpoint, not a safetensors file; "
                           f"nervedet never unpickles weights")
    raise WeightsError(f"{path}: corrupt safetensors file (no valid header; truncated or not safetensors)")


def _json_field(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta.get(key) or "{}")
    except ValueError:
        raise WeightsError(f"{path}: metadata {key!r} is not valid JSON") from None


def _check_match(path: Path, network: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    problems = [f"{label} {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                if names]
    if problems:
        raise WeightsError(f"{path}: weights do not match their architecture: {'; '.join(problems)}")


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> Model:
    """Load a nervedet weights file (the bundled default when ``path`` is None) onto ``device``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    dev = resolve_device(device)
    path = default_weights_path() if path is None else Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights ({exc.strerror or exc})") from None
    _, meta = _parse(path, data)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a nervedet weights file (safetensors metadata format is "
                           f"{meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version", "")
    if version != FORMAT_VERSION:
        raise WeightsError(f"{path}: weights format version {version!r} is not supported (this nervedet "
                           f"reads {FORMAT_VERSION}; upgrade nervedet)")
    try:
        config = ModelConfig.from_dict(_json_field(path, meta, "config"), source=f"{path} (config metadata)")
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: corrupt safetensors file ({reason})") from None
    with torch.device("meta"):  # shapes only: no random initialisation that the weights overwrite anyway
        network = build_network(config)
    _check_match(path, network, tensors)
    reference = network.state_dict()
    state = {k: t.to(reference[k].dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    network.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (non-persistent buffer): build for real instead
        network = build_network(config)
        network.load_state_dict(state, strict=True)
    network.to(dev).eval()
    metadata = {"training": _json_field(path, meta, "training"), "metrics": _json_field(path, meta, "metrics"),
                "nervedet_version": meta.get("nervedet_version"), "created": meta.get("created"),
                "format_version": version}
    sha = hashlib.sha256(data).hexdigest()
    log.info("loaded %s (%s, sha256 %s…) on %s", path, config.encoder, sha[:12], dev)
    return Model(network=network, config=config, metadata=metadata, path=path, sha256=sha)
