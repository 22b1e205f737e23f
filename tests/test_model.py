"""ModelConfig schema (every bad field is a ConfigError naming it), round trips, and the network's shape."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nervedet.model import ClassSpec, ConfigError, ModelConfig, build_network, normalize


def good() -> dict[str, Any]:
    return ModelConfig().to_dict()


def setter(path: str, value: Any) -> Callable[[dict], None]:
    """Set (or delete, when value is DELETE) a dotted path; numbers index lists."""
    def apply(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if value is DELETE:
            del d[int(last) if isinstance(d, list) else last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return apply


DELETE = object()

BAD_FIELDS = [
    ("architecture", DELETE, "missing architecture"),
    ("architecture", "unet", "architecture has the wrong type"),
    ("architecture.name", DELETE, "missing architecture.name"),
    ("architecture.name", "fpn", "architecture.name 'fpn'"),
    ("architecture.encoder", DELETE, "missing architecture.encoder"),
    ("architecture.encoder", "resnet101", "architecture.encoder 'resnet101'"),
    ("architecture.encoder", 18, "architecture.encoder has the wrong type"),
    ("architecture.decoder_channels", DELETE, "missing architecture.decoder_channels"),
    ("architecture.decoder_channels", [16, 16, 16, 16], "architecture.decoder_channels"),
    ("architecture.decoder_channels", [16, 16, 16, 16, 0], "architecture.decoder_channels"),
    ("architecture.decoder_channels", [16, 16, 16, 16, 8.0], "architecture.decoder_channels"),
    ("architecture.decoder_channels", "16", "architecture.decoder_channels has the wrong type"),
    ("classes", DELETE, "missing classes"),
    ("classes", {"name": "Nerve"}, "classes has the wrong type"),
    ("classes", [{"name": "Background", "color": [0, 0, 0]}], "classes needs at least two"),
    ("classes.1", "Tumor", "missing classes[1].name"),
    ("classes.1.name", DELETE, "missing classes[1].name"),
    ("classes.1.name", 3, "classes[1].name has the wrong type"),
    ("classes.2.color", DELETE, "classes[2].color"),
    ("classes.2.color", [255, 0], "classes[2].color"),
    ("classes.2.color", [255, 0, 256], "classes[2].color"),
    ("classes.2.color", "red", "classes[2].color"),
    ("classes.2.name", "Tumor", "class names must be unique"),
    ("heatmap", DELETE, "missing heatmap"),
    ("heatmap.name", DELETE, "missing heatmap.name"),
    ("heatmap.color", [1, 2, -3], "heatmap.color"),
    ("heatmap.sigma_um", DELETE, "missing heatmap.sigma_um"),
    ("heatmap.sigma_um", "1", "heatmap.sigma_um has the wrong type"),
    ("heatmap.sigma_um", 0, "heatmap.sigma_um"),
    ("analysis_mpp", DELETE, "missing analysis_mpp"),
    ("analysis_mpp", "0.5", "analysis_mpp has the wrong type"),
    ("analysis_mpp", True, "analysis_mpp has the wrong type"),
    ("analysis_mpp", -0.5, "analysis_mpp"),
    ("tile_size", DELETE, "missing tile_size"),
    ("tile_size", 256.0, "tile_size has the wrong type"),
    ("tile_size", 32, "tile_size must be a multiple of 32"),
    ("tile_size", 100, "tile_size must be a multiple of 32"),
    ("normalization", DELETE, "missing normalization"),
    ("normalization.mean", DELETE, "normalization.mean"),
    ("normalization.mean", [0.5, 0.5], "normalization.mean"),
    ("normalization.std", [0.2, 0.0, 0.2], "normalization.std must be positive"),
    ("normalization.std", ["a", 1, 1], "normalization.std must be three numbers"),
]


@pytest.mark.parametrize("field,value,expected", BAD_FIELDS, ids=[f"{f}={v!r}"[:60] for f, v, _ in BAD_FIELDS])
def test_every_bad_field_is_a_config_error_naming_it(field, value, expected):
    d = copy.deepcopy(good())
    setter(field, value)(d)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(d, source="cfg.yaml")
    message = str(info.value)
    assert message.startswith("cfg.yaml: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("value", [None, [], "unet"])
def test_not_a_mapping_is_a_config_error(value):
    with pytest.raises(ConfigError, match="not a mapping"):
        ModelConfig.from_dict(value)


def test_to_dict_from_dict_round_trip():
    custom = ModelConfig(encoder="resnet34", decoder_channels=(64, 32, 16, 16, 8),
                         classes=(ClassSpec("Other", (1, 2, 3)), ClassSpec("Nerve", (4, 5, 6)),
                                  ClassSpec("Tumor", (7, 8, 9)), ClassSpec("Fat", (10, 11, 12))),
                         heatmap=ClassSpec("Lymphocytes", (13, 14, 15)), heatmap_sigma_um=1.5,
                         analysis_mpp=1.0, tile_size=320, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    for config in (ModelConfig(), custom):
        d = config.to_dict()
        again = ModelConfig.from_dict(copy.deepcopy(d))
        assert again == config and again.to_dict() == d
    assert custom != ModelConfig()


def test_packaged_yaml_is_the_default_config(tmp_path):
    assert ModelConfig.from_yaml() == ModelConfig()
    bad = tmp_path / "m.yaml"
    bad.write_text("architecture: {name: unet, encoder: resnet18, decoder_channels: [1, 2, 3, 4, 5]}\n")
    with pytest.raises(ConfigError, match=f"{bad}: missing classes"):
        ModelConfig.from_yaml(bad)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_network_has_one_channel_per_class_plus_heatmap(n_classes):
    classes = tuple(ClassSpec(f"C{i}", (i, i, i)) for i in range(n_classes))
    config = ModelConfig(decoder_channels=(16, 16, 8, 8, 8), classes=classes, tile_size=64)
    torch.manual_seed(0)
    net = build_network(config).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 64, 96))
    assert config.out_channels == n_classes + 1
    assert out.shape == (2, n_classes + 1, 64, 96)


def test_normalize_uint8_and_float_agree():
    config = ModelConfig()
    rgb = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    a, b = normalize(rgb, config), normalize(rgb.float() / 255, config)
    assert torch.allclose(a, b, atol=1e-6)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    assert torch.allclose(normalize(mean.expand(1, 3, 4, 4), config), torch.zeros(1, 3, 4, 4), atol=1e-6)


def test_normalize_is_mean_and_std_scaling_in_the_memory_format_asked():
    config = ModelConfig()
    rgb = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(config.mean).view(1, 3, 1, 1), torch.tensor(config.std).view(1, 3, 1, 1)
    out = normalize(rgb, config, torch.channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (rgb.float() / 255 - mean) / std, atol=1e-6, rtol=0)
    x = rgb.float() / 255
    kept = x.clone()
    normalize(x, config)
    assert torch.equal(x, kept)  # a float batch is not normalised in place


def test_unknown_setting_is_named():
    data = ModelConfig().to_dict() | {"tile_sise": 256}
    with pytest.raises(ConfigError, match="unknown setting tile_sise"):
        ModelConfig.from_dict(data)
