"""Weights files: safetensors round trip with metadata, atomic writes, and refusals that never unpickle."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import nervedet
from nervedet import weights as W
from nervedet.model import ModelConfig, build_network
from nervedet.weights import Model, WeightsError, load_model, resolve_device, save_weights

TRAINING = {"slides": ["a.svs", "b.svs"], "seeds": [1, 2], "patches": 1200, "epochs": 3, "duration_s": 12.5}
METRICS = {"dice_nerve": 0.81, "dice_tumor": 0.9, "immune_f1": 0.7}


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelConfig, torch.nn.Module, torch.Tensor]:
    """A small resnet18 U-Net whose weights and BatchNorm statistics differ from a fresh build."""
    torch.manual_seed(0)
    config = ModelConfig(decoder_channels=(32, 16, 16, 8, 8), tile_size=64)
    net = build_network(config)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return config, net, x


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    config, net, _ = tiny
    return save_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", net, config,
                        training=TRAINING, metrics=METRICS)


@pytest.fixture
def no_unpickling(monkeypatch) -> list[str]:
    """Make every unpickling entry point record its use and raise; the test asserts the list stays empty."""
    calls: list[str] = []

    def guard(name: str):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")
        return refuse

    class GuardUnpickler:
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            raise AssertionError("pickle.Unpickler was used")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, guard(f"{target.__name__}.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", GuardUnpickler)
    return calls


def refusal(path: Path) -> str:
    with pytest.raises(WeightsError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def rewrite(src: Path, dst: Path, metadata: dict[str, str] | None) -> Path:
    safetensors.torch.save_file(safetensors.torch.load_file(src), dst, metadata=metadata)
    return dst


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as fh:
        return dict(fh.metadata())


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_float32_gives_identical_outputs(tiny, saved):
    config, net, x = tiny
    model = load_model(saved)
    assert isinstance(model, Model) and model.config == config and model.path == saved
    assert not model.network.training and model.device == torch.device("cpu")
    fresh = build_network(config).eval()
    with torch.no_grad():
        expected = net(x)
        got = model.network(x)
        assert not torch.allclose(fresh(x), expected)  # the comparison below is not trivially true
    assert got.shape == (1, config.out_channels, 64, 64)
    assert torch.equal(got, expected)
    for name, tensor in net.state_dict().items():
        assert torch.equal(model.network.state_dict()[name], tensor), name


def test_float16_storage_is_half_size_and_loads_as_float32(tiny, saved, tmp_path):
    config, net, x = tiny
    half = save_weights(tmp_path / "half.safetensors", net, config, dtype=torch.float16)
    assert half.stat().st_size < 0.55 * saved.stat().st_size
    with safe_open(half, "pt") as fh:
        assert fh.get_tensor("encoder.conv1.weight").dtype == torch.float16
        assert fh.get_tensor("encoder.bn1.num_batches_tracked").dtype == torch.int64
    model = load_model(half)
    assert all(p.dtype == torch.float32 for p in model.network.parameters())
    with torch.no_grad():
        expected, got = net(x), model.network(x)
    scale = expected.abs().max().item()
    assert not torch.equal(got, expected)
    assert torch.allclose(got, expected, atol=1e-2 * scale, rtol=0)


def test_metadata_round_trips(tiny, saved):
    config, _, _ = tiny
    model = load_model(saved)
    assert model.metadata["training"] == TRAINING
    assert model.metadata["metrics"] == METRICS
    assert model.metadata["nervedet_version"] == nervedet.__version__
    assert model.metadata["format_version"] == "1"
    assert datetime.fromisoformat(model.metadata["created"]).tzinfo is not None
    raw = metadata_of(saved)
    assert raw["format"] == "nervedet-weights" and raw["format_version"] == "1"
    assert ModelConfig.from_dict(json.loads(raw["config"])) == config
    assert all(isinstance(v, str) for v in raw.values())


def test_sha256_is_the_file_hash(saved):
    assert load_model(saved).sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()


def test_save_is_atomic_and_leaves_no_temp_file(tiny, tmp_path):
    config, net, _ = tiny
    out = save_weights(tmp_path / "sub" / "w.safetensors", net, config)
    assert out == tmp_path / "sub" / "w.safetensors"
    assert [p.name for p in out.parent.iterdir()] == ["w.safetensors"]


def test_failed_save_keeps_the_existing_file(tiny, tmp_path, monkeypatch):
    config, net, _ = tiny
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous weights")

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half written")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_weights(target, net, config)
    assert target.read_bytes() == b"previous weights"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ---------------------------------------------------------------------------------------------- refusals
def test_torch_save_checkpoint_is_refused_without_unpickling(tiny, tmp_path, no_unpickling):
    _, net, _ = tiny
    path = tmp_path / "x.safetensors"
    torch.save(net.state_dict(), path)
    assert path.read_bytes()[:2] == b"PK"
    message = refusal(path)
    assert "pickle" in message and "never unpickles" in message
    assert no_unpickling == []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickle_is_refused_without_unpickling(tmp_path, no_unpickling, protocol):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(pickle.dumps({"encoder.conv1.weight": [1.0, 2.0]}, protocol=protocol))
    assert "pickle" in refusal(path)
    assert no_unpickling == []


@pytest.mark.parametrize("keep", [0, 5, 40, 0.5, -1])
def test_truncated_file_is_corrupt(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:n])
    message = refusal(path)
    assert "corrupt safetensors file" in message and "pickle" not in message


def test_safetensors_without_nervedet_metadata_is_refused(saved, tmp_path):
    assert "not a nervedet weights file" in refusal(rewrite(saved, tmp_path / "plain.safetensors", None))
    other = rewrite(saved, tmp_path / "other.safetensors", {"format": "pt"})
    assert "not a nervedet weights file" in refusal(other)


def test_newer_format_version_is_refused(saved, tmp_path):
    meta = metadata_of(saved) | {"format_version": "2"}
    assert "format version '2'" in refusal(rewrite(saved, tmp_path / "v2.safetensors", meta))


def test_config_tampered_to_another_encoder_is_a_mismatch(saved, tmp_path):
    meta = metadata_of(saved)
    config = json.loads(meta["config"])
    config["architecture"]["encoder"] = "resnet34"
    path = rewrite(saved, tmp_path / "r34.safetensors", meta | {"config": json.dumps(config)})
    message = refusal(path)
    assert "weights do not match their architecture" in message
    assert "missing" in message and "encoder.layer" in message


def test_config_with_more_classes_is_a_shape_mismatch(saved, tmp_path):
    meta = metadata_of(saved)
    config = json.loads(meta["config"])
    config["classes"].append({"name": "Fat", "color": [250, 250, 100]})
    message = refusal(rewrite(saved, tmp_path / "c4.safetensors", meta | {"config": json.dumps(config)}))
    assert "weights do not match their architecture" in message
    assert "wrong shape" in message and "segmentation_head" in message


def test_invalid_config_gives_the_config_error(saved, tmp_path):
    meta = metadata_of(saved)
    config = json.loads(meta["config"])
    config["architecture"]["encoder"] = "vgg16"
    message = refusal(rewrite(saved, tmp_path / "bad.safetensors", meta | {"config": json.dumps(config)}))
    assert "architecture.encoder 'vgg16'" in message


def test_missing_file_is_refused(tmp_path):
    assert "not found" in refusal(tmp_path / "nope.safetensors")


def test_bundled_weights_lookup_and_missing_message(saved, tmp_path, monkeypatch):
    candidates = W.bundled_weights_candidates()
    assert candidates[0] == Path(nervedet.__file__).parent / "weights" / W.BUNDLED_NAME
    assert candidates[1] == Path(nervedet.__file__).resolve().parents[1] / "weights" / W.BUNDLED_NAME
    monkeypatch.setattr(W, "bundled_weights_candidates", lambda: [tmp_path / "a" / W.BUNDLED_NAME])
    with pytest.raises(WeightsError, match="scripts/train_default.py") as info:
        load_model()
    assert "bundled weights" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(W, "bundled_weights_candidates", lambda: [tmp_path / "a" / W.BUNDLED_NAME, saved])
    assert load_model().path == saved


# ---------------------------------------------------------------------------------------------- devices
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(WeightsError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(WeightsError, match="CUDA is not available") as info:
                resolve_device(name)
            assert "\n" not in str(info.value)


def test_non_persistent_buffers_fall_back_to_a_real_build(saved, tiny, monkeypatch):
    config, net, x = tiny

    def with_extra_buffer(cfg):
        network = build_network(cfg)
        network.register_buffer("extra", torch.ones(1), persistent=False)
        return network

    monkeypatch.setattr(W, "build_network", with_extra_buffer)
    model = load_model(saved)
    assert not any(t.is_meta for t in [*model.network.parameters(), *model.network.buffers()])
    with torch.no_grad():
        assert torch.equal(model.network(x), net(x))


def test_bundled_default_weights_load_with_their_model_card_numbers() -> None:
    from nervedet.model import ModelConfig

    model = load_model()  # the file in weights/, committed with the repository
    assert model.config == ModelConfig.from_yaml()
    training, metrics = model.metadata["training"], model.metadata["metrics"]
    assert training["slides"] >= 10 and training["steps"] > 100
    assert 0.0 <= metrics["val/dice_nerve"] <= 1.0
    assert model.path.stat().st_size < 100e6
