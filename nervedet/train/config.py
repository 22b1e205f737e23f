"""Training settings from a YAML file with ``key.path=value`` overrides from the command line."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from nervedet.model import ConfigError


@dataclass(frozen=True)
class SyntheticData:
    """Synthetic slides made with `nervedet synth` (cached in ``cache``) as training data."""

    count: int = 0
    seed: int = 1000
    width_mm: float = 1.5
    height_mm: float = 1.5
    mpp: float = 0.25
    stain_jitter: float = 1.0
    tissue_fraction: float = 0.8
    cache: str = ".cache/synth"


@dataclass(frozen=True)
class DataSettings:
    slides: tuple[dict, ...] = ()  # {slide: path, labels: path, mpp: optional}
    folders: tuple[str, ...] = ()  # every slide with a same-stem .geojson next to it
    negatives: tuple[str, ...] = ()  # images or folders of images known to hold no nerve
    negatives_mpp: float = 0.5
    synthetic: SyntheticData = SyntheticData()
    val_fraction: float = 0.2
    val_slides: tuple[dict, ...] = ()  # explicit validation slides (then val_fraction is not used)


@dataclass(frozen=True)
class Optimisation:
    max_steps: int = 300
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patches_per_epoch: int = 400
    val_patches: int = 64
    workers: int = 2
    precision: str = "auto"  # auto | 32 | bf16-mixed | 16-mixed
    device: str = "auto"
    seed: int = 0
    patience: int = 6  # epochs without a better validation score before stopping
    heat_weight: float = 10.0
    augment: float = 1.0  # augmentation strength, 0 = none
    # Scale-out through Lightning. batch_size is per process (as in Lightning): the global batch is
    # batch_size x devices x num_nodes; patches_per_epoch and val_patches are totals over all processes.
    devices: int | str = "auto"  # processes (GPUs, or CPU processes) per node; auto = 1 (the one `device`)
    num_nodes: int = 1  # machines; with SLURM, `srun` starts one task per device on each node
    strategy: str = "auto"  # Lightning strategy: auto (ddp when there are several processes) | ddp | ddp_spawn ...

    def __post_init__(self) -> None:
        d = self.devices
        if d != "auto" and not (isinstance(d, int) and not isinstance(d, bool) and d >= 1):
            raise ConfigError(f"train.devices must be auto or a whole number of 1 or more, not {d!r}")
        n = self.num_nodes
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ConfigError(f"train.num_nodes must be a whole number of 1 or more, not {n!r}")
        if not isinstance(self.strategy, str) or not self.strategy.strip():
            raise ConfigError(f"train.strategy must be a Lightning strategy name such as auto or ddp, "
                              f"not {self.strategy!r}")

    @property
    def processes(self) -> int:
        """Training processes over all nodes (world size)."""
        return (1 if self.devices == "auto" else int(self.devices)) * self.num_nodes


@dataclass(frozen=True)
class TrainConfig:
    model: str | None = None  # model YAML; None = the packaged nervedet/configs/model.yaml
    init_weights: str | None = None  # start from this weights file (fine-tuning); "bundled" = the default weights
    data: DataSettings = DataSettings()
    train: Optimisation = Optimisation()
    out_dir: str = "runs/train"
    weights_out: str | None = None  # default OUT_DIR/model.safetensors
    resume: bool = True
    source: str = field(default="", compare=False)

    @property
    def weights_path(self) -> Path:
        return Path(self.weights_out) if self.weights_out else Path(self.out_dir) / "model.safetensors"


def _build(cls, data: dict[str, Any], where: str):
    """A (nested) frozen dataclass from a dict; unknown keys are errors that name them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting {where}{unknown[0]} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if hasattr(default, "__dataclass_fields__"):
            kwargs[name] = _build(type(default), value or {}, f"{where}{name}.")
        elif isinstance(default, tuple):
            if value is None:
                value = ()
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}{name} must be a list")
            kwargs[name] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}{name} must be true or false")
            kwargs[name] = value
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{where}{name} must be a number, not {value!r}")
            kwargs[name] = type(default)(value) if isinstance(default, float) or float(value).is_integer() \
                else value
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read the YAML (None: all defaults) and apply ``section.key=value`` overrides (values parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        _set(raw, key.strip(), yaml.safe_load(text))
    try:
        cfg = _build(TrainConfig, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{path or 'training config'}: {exc}") from None
    return TrainConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)}, "source": str(path or "")})
