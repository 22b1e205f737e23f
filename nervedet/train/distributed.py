"""Training on several processes (GPUs or CPU processes, on one or more nodes) through Lightning's DDP.

Lightning's ``ddp`` starts the other processes of a node by running the same command again (with
``LOCAL_RANK`` set) when ``Trainer.fit`` begins; under SLURM ``srun`` starts them all at once. Every process
builds the same data split (same seed); Lightning gives each one a ``DistributedSampler`` share of the
patches, validation counts are summed over the processes (NerveSegmenter), and only global rank 0 writes
files of its own (the weights file; Lightning's checkpoints and CSV logs are rank 0's already).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, Strategy, StrategyRegistry

from nervedet.model import ConfigError
from nervedet.train.config import Optimisation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """What the Trainer gets: accelerator, devices (a count, or the one GPU's index list) and strategy."""

    accelerator: str
    devices: int | list[int]
    num_nodes: int
    strategy: str | Strategy

    @property
    def per_node(self) -> int:
        return self.devices if isinstance(self.devices, int) else len(self.devices)


def placement(o: Optimisation, device: torch.device) -> Placement:
    """The Trainer's placement for the config: one device as before unless ``devices``/``num_nodes`` ask
    for more; DDP on the CPU uses the gloo backend."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    if o.devices == "auto":
        devices: int | list[int] = [device.index or 0] if device.type == "cuda" else 1
    elif device.type == "cuda" and device.index is not None and o.devices != 1:
        raise ConfigError(f"train.device {device} names one GPU; use train.device=cuda (or auto) with "
                          f"train.devices={o.devices}")
    elif device.type == "cuda" and o.devices > torch.cuda.device_count():
        raise ConfigError(f"train.devices={o.devices} but this machine has {torch.cuda.device_count()} GPU(s)")
    else:
        devices = [device.index] if device.index is not None else int(o.devices)
    per_node = devices if isinstance(devices, int) else len(devices)
    return Placement(accelerator, devices, o.num_nodes,
                     build_strategy(o.strategy, accelerator, per_node * o.num_nodes))


def build_strategy(name: str, accelerator: str, processes: int) -> str | Strategy:
    """A Lightning strategy from its registered name; the DDP family on the CPU with the gloo backend.
    ``auto`` is DDP when there are several processes (Lightning's own choice, made explicit)."""
    name = name.strip()
    if name == "auto":
        if processes <= 1:
            return "auto"
        name = "ddp"
    if name not in StrategyRegistry:
        known = ", ".join(["auto", *sorted(StrategyRegistry.available_strategies())])
        raise ConfigError(f"train.strategy {name!r} is not a Lightning strategy (known: {known})")
    entry = StrategyRegistry[name]
    if entry["strategy"] is DDPStrategy:
        params = dict(entry["init_params"])
        if accelerator == "cpu":
            params["process_group_backend"] = "gloo"
        return DDPStrategy(**params)
    return name


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held on ``path`` (made if missing) for the block: processes started together (srun)
    take turns at preparing shared data instead of all writing it at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (files are still written under a temporary name and renamed)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class RankReport(pl.Callback):
    """One log line per process at the start of training: its rank, the world size, the backend, and its
    share of the training patches, so a user sees that every process runs and samples its own part."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size <= 1:
            return
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        log.info("rank %d of %d (node %d, %s backend, %d threads): %d training patches per epoch in batches "
                 "of %d", trainer.global_rank, trainer.world_size, trainer.node_rank, backend,
                 torch.get_num_threads(), len(sampler) if sampler is not None else -1,
                 getattr(loader, "batch_size", -1))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A checksum of the parameters per process: DDP keeps the replicas equal, so all lines agree."""
        if trainer.world_size <= 1:
            return
        with torch.no_grad():
            checksum = sum(float(p.double().abs().sum()) for p in pl_module.parameters())
        log.info("rank %d of %d: finished at step %d, parameter checksum %.12g", trainer.global_rank,
                 trainer.world_size, trainer.global_step, checksum)
