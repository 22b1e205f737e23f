"""`nervedet train`: data from the config, Lightning fit with checkpoints and resume, export of the weights."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from nervedet.model import ModelConfig
from nervedet.train.augment import build_augment
from nervedet.train.config import SyntheticData, TrainConfig
from nervedet.train.data import SlideSpec
from nervedet.train.dataset import PatchDataset, describe, split_by_slide
from nervedet.train.distributed import RankReport, file_lock, placement
from nervedet.train.module import NerveSegmenter
from nervedet.weights import cpu_bf16_supported, cpu_threads, resolve_device, save_weights

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class TrainResult:
    weights_path: Path
    metrics: dict[str, float]
    steps: int
    epochs: int
    minutes: float
    last_checkpoint: Path | None
    rank: int = 0  # global rank of this process; only rank 0 wrote the weights file


def _labels_for(slide: Path) -> Path | None:
    for suffix in (".geojson", ".geojson.gz", ".json"):
        cand = slide.with_name(slide.name.split(".")[0] + suffix)
        if cand.exists():
            return cand
    return None


def synthetic_folder(s: SyntheticData) -> Path:
    """The cache folder of synthetic slides made with these settings (one folder per setting)."""
    return Path(s.cache) / f"w{s.width_mm:g}_h{s.height_mm:g}_mpp{s.mpp:g}_tf{s.tissue_fraction:g}_sj{s.stain_jitter:g}"


def synthetic_specs(cfg: TrainConfig) -> list[SlideSpec]:
    """Synthetic slides of the config, made once and cached (same settings, same files)."""
    from nervedet.synth import SynthSettings, cached_synthetic_slide

    s = cfg.data.synthetic
    if s.count <= 0:
        return []
    folder = synthetic_folder(s)
    specs = []
    with file_lock(folder / ".lock"):  # processes started together (srun) make each slide once
        for seed in range(s.seed, s.seed + s.count):
            specs.append(SlideSpec(*cached_synthetic_slide(folder, SynthSettings(
                seed=seed, width_mm=s.width_mm, height_mm=s.height_mm, mpp=s.mpp, stain_jitter=s.stain_jitter,
                tissue_fraction=s.tissue_fraction))))
    return specs


def slide_specs(cfg: TrainConfig) -> tuple[list[SlideSpec], list[SlideSpec], list[SlideSpec]]:
    """(annotated slides, explicit validation slides, negatives) named by the config."""
    specs = [SlideSpec(Path(d["slide"]), Path(d["labels"]) if d.get("labels") else None, d.get("mpp"))
             for d in cfg.data.slides]
    for folder in map(Path, cfg.data.folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: training folder not found")
        for slide in sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES):
            labels = _labels_for(slide)
            if labels is None:
                log.warning("%s: no GeoJSON with the same name; skipped", slide)
                continue
            specs.append(SlideSpec(slide, labels))
    specs += synthetic_specs(cfg)
    val = [SlideSpec(Path(d["slide"]), Path(d["labels"]) if d.get("labels") else None, d.get("mpp"))
           for d in cfg.data.val_slides]
    negatives = []
    for item in map(Path, cfg.data.negatives):
        files = sorted(item.iterdir()) if item.is_dir() else [item]
        negatives += [SlideSpec(f, None, cfg.data.negatives_mpp, negative=True) for f in files
                      if f.suffix.lower() in IMAGE_SUFFIXES]
    for s in [*specs, *val, *negatives]:
        if not s.slide.exists():
            raise FileNotFoundError(f"{s.slide}: slide not found")
        if s.labels is not None and not s.labels.exists():
            raise FileNotFoundError(f"{s.labels}: annotations not found")
    return specs, val, negatives


def _precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    # CPU autocast in bfloat16 is about 4x faster than float32 where the CPU has bf16, much slower where not
    return "bf16-mixed" if cpu_bf16_supported() else "32-true"


def _init_from(module: NerveSegmenter, source: str, model_cfg: ModelConfig) -> None:
    """Start the network from a weights file ("bundled": the default weights).

    Its config must match the training's except for ``tile_size``: that is only the training patch size (the
    network is fully convolutional), so a model trained on 256-px patches may be fine-tuned on larger ones.
    """
    from nervedet.weights import WeightsError, load_model

    init = load_model(None if source == "bundled" else source)
    theirs, ours = init.config.to_dict(), model_cfg.to_dict()
    differ = sorted(k for k in ours.keys() | theirs.keys() if k != "tile_size" and theirs.get(k) != ours.get(k))
    if differ:
        raise WeightsError(f"{init.path}: its model config differs from the training's in {', '.join(differ)}; "
                           "cannot start from it")
    module.network.load_state_dict(init.network.state_dict())
    log.info("starting from the weights %s (sha256 %s…)", init.path, init.sha256[:12])


def train(cfg: TrainConfig) -> TrainResult:
    """Train from the config; resumes from OUT_DIR/checkpoints/last.ckpt when it exists and cfg.resume."""
    t0 = time.time()
    o = cfg.train
    device = resolve_device(o.device)
    where = placement(o, device)  # before any data is read: a bad devices/strategy setting fails at once
    if where.accelerator == "cpu" and (threads := cpu_threads(where.per_node)):
        log.info("%d training processes on this node's CPU: %d torch thread(s) each", where.per_node, threads)
    pl.seed_everything(o.seed, workers=True)
    model_cfg = ModelConfig.from_yaml(cfg.model)
    specs, val, negatives = slide_specs(cfg)
    if not specs:
        raise ValueError(f"{cfg.source or 'training config'}: no training slides (data.slides, data.folders or "
                         "data.synthetic)")
    if val:
        train_specs = specs
    else:
        train_specs, val = split_by_slide(specs, cfg.data.val_fraction, o.seed)
    train_specs = [*train_specs, *negatives]
    log.info("training on %d slides (%d negatives), validating on %d", len(train_specs), len(negatives), len(val))
    augment = build_augment(model_cfg, o.augment) if o.augment > 0 else None
    # patches_per_epoch and val_patches are totals over the processes (each gets its share through
    # Lightning's DistributedSampler); validation is rounded up to a multiple of the processes so that no
    # patch is counted twice
    n_val = -(-o.val_patches // o.processes) * o.processes
    if n_val != o.val_patches:
        log.info("val_patches %d rounded up to %d, a multiple of the %d processes", o.val_patches, n_val,
                 o.processes)
    train_ds = PatchDataset(train_specs, model_cfg, o.patches_per_epoch, o.seed, augment)
    val_ds = PatchDataset(val, model_cfg, n_val, o.seed + 1, None)
    loader_args = dict(batch_size=o.batch_size, num_workers=o.workers, persistent_workers=o.workers > 0)
    train_dl = DataLoader(train_ds, shuffle=True, drop_last=True, **loader_args)
    val_dl = DataLoader(val_ds, shuffle=False, **loader_args)

    precision = _precision(o.precision, device)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    module = NerveSegmenter(model_cfg.to_dict(), lr=o.lr, weight_decay=o.weight_decay, heat_weight=o.heat_weight,
                            max_steps=o.max_steps)
    if cfg.init_weights:
        _init_from(module, cfg.init_weights, model_cfg)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/score", mode="max", save_top_k=1)
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False)
    trainer = pl.Trainer(
        max_steps=o.max_steps, max_time={"minutes": o.max_minutes} if o.max_minutes else None,
        accelerator=where.accelerator, devices=where.devices, num_nodes=where.num_nodes, strategy=where.strategy,
        precision=precision, default_root_dir=out,
        callbacks=[best, latest, EarlyStopping(monitor="val/score", mode="max", patience=o.patience, strict=False,
                                               check_on_train_epoch_end=False),
                   TQDMProgressBar(refresh_rate=5), RankReport()],
        logger=CSVLogger(out, name="logs"), log_every_n_steps=1, num_sanity_val_steps=0,
        enable_model_summary=False, max_epochs=-1,
    )
    last = ckpt_dir / "last.ckpt"
    resume = last if cfg.resume and last.exists() else None
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, train_dl, val_dl, ckpt_path=resume)
    trainer.save_checkpoint(last)  # the final state, so that a longer run continues exactly from here
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    minutes = (time.time() - t0) / 60
    if not trainer.is_global_zero:  # the same trained network (DDP keeps the replicas equal): rank 0 writes
        return TrainResult(cfg.weights_path, metrics, trainer.global_step, trainer.current_epoch, minutes,
                           last if last.exists() else None, trainer.global_rank)
    summary = describe(train_specs) | {
        "validation_slides": len(val), "steps": trainer.global_step, "epochs": trainer.current_epoch,
        "minutes": round(minutes, 1), "batch_size": o.batch_size, "device": str(device),
        "precision": precision, "config": cfg.source, "init_weights": cfg.init_weights,
        "processes": trainer.world_size, "num_nodes": trainer.num_nodes, "strategy": type(trainer.strategy).__name__,
        "global_batch_size": o.batch_size * trainer.world_size, "val_patches_seen": module.val_patches_seen,
    }
    weights = save_weights(cfg.weights_path, module.network.cpu(), model_cfg, training=summary, metrics=metrics)
    log.info("weights written to %s", weights)
    return TrainResult(weights, metrics, trainer.global_step, trainer.current_epoch, minutes,
                       last if last.exists() else None)
