"""Training settings: presets, validation messages, YAML round trip, unknown keys refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from covid_cxr.config import AugmentSettings, TrainConfig, dump_config, load_config, make_config
from covid_cxr.errors import ConfigError
from covid_cxr.networks import network_entry


def test_paper_preset_is_table_2() -> None:
    c = make_config("paper", network="concat").resolved(image_size=300)
    assert (c.lr, c.epochs_per_phase, c.batch_size, c.image_size, c.scaling) == (1e-4, 100, 20, 300, "unit")
    assert c.pretrained == "imagenet" and c.drop_rate == 0.5
    assert make_config("paper", network="xception").resolved(image_size=300).batch_size == 30
    assert network_entry("resnet50v2").paper_batch_size == 30
    aug = c.augment
    assert (aug.rotation_range, aug.zoom_range, aug.width_shift_range, aug.height_shift_range, aug.shear_range) == (
        360.0, 0.05, 0.05, 0.05, 0.05,
    )  # fmt: skip
    assert aug.horizontal_flip and aug.vertical_flip


def test_cpu_preset_is_small_and_overridable() -> None:
    c = make_config("cpu")
    assert c.preset == "cpu" and c.pretrained == "none" and c.image_size is not None and c.image_size <= 128
    assert c.epochs_per_phase < 10
    assert make_config("cpu", epochs_per_phase=5, batch_size=None).epochs_per_phase == 5  # None keeps the preset's


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"network": "vgg16"}, "network must be one of concat, xception, resnet50v2"),
        ({"image_size": 64}, "image_size must be an integer in [71"),
        ({"lr": 0.0}, "lr must be a number in (0.0, 1.0]"),
        ({"fold": 0}, "fold must be an integer in [1"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"epochs_per_phase": 1.5}, "epochs_per_phase must be an integer"),
        ({"bogus": 1}, "unknown setting(s) bogus; valid settings are data, network"),
        ({"pretrained": "none", "weights_files": ("x.h5",)}, "loaded only with --pretrained imagenet"),
    ],
)
def test_bad_values_name_the_valid_range(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config("paper", **overrides)
    assert message in str(err.value)


def test_unknown_preset_and_augment_keys() -> None:
    with pytest.raises(ConfigError, match="preset must be one of paper, cpu"):
        make_config("fast")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) rotate"):
        TrainConfig.from_dict({"augment": {"rotate": 10}})
    with pytest.raises(ConfigError, match="shear_range must be a number"):
        AugmentSettings(shear_range=-1.0)


def test_yaml_round_trip_and_refusal(tmp_path: Path) -> None:
    c = make_config("cpu", network="resnet50v2", weights_files=None, seed=7).resolved(image_size=96)
    path = dump_config(c, tmp_path / "config.yaml", extra={"runtime": "device=cpu precision=fp32"})
    assert load_config(path) == c
    assert "recorded:" in path.read_text()
    path.write_text(path.read_text().replace("seed: 7", "seed: 7\nlearning_rate: 0.1"))
    with pytest.raises(ConfigError, match=r"config.yaml: unknown setting\(s\) learning_rate"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such settings file"):
        load_config(tmp_path / "missing.yaml")


def test_a_near_miss_is_answered_with_the_nearest_valid_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) epochs_per_phse \(did you mean 'epochs_per_phase'\?\)"):
        make_config("paper", epochs_per_phse=3)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) rotaton_range \(did you mean 'rotation_range'\?\)"):
        TrainConfig.from_dict({"augment": {"rotaton_range": 10}})
    with pytest.raises(ConfigError, match=r"got 'conact' \(did you mean 'concat'\?\)"):
        make_config("paper", network="conact")
    with pytest.raises(ConfigError, match=r"got 'papr' \(did you mean 'paper'\?\)"):
        make_config("papr")
    with pytest.raises(ConfigError, match=r"got 'bf61' \(did you mean 'bf16'\?\)"):
        make_config("paper", precision="bf61")
    # Nothing close: no guess, only the valid list.
    with pytest.raises(ConfigError) as err:
        make_config("paper", network="vgg16")
    assert "did you mean" not in str(err.value)
    path = tmp_path / "config.yaml"
    path.write_text("network: concat\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"config.yaml: unknown setting\(s\) batchsize \(did you mean 'batch_size'\?\)"):
        load_config(path)


def test_defaults_come_from_the_network_entries() -> None:
    for name in ("concat", "xception", "resnet50v2"):
        entry = network_entry(name)
        c = make_config("paper", network=name).resolved(image_size=entry.image_size)
        assert c.batch_size == entry.paper_batch_size and c.image_size == entry.image_size == 300
        assert (c.lr, c.nadam_eps, c.nadam_momentum_decay) == (
            entry.optimizer.lr, entry.optimizer.eps, entry.optimizer.momentum_decay,
        )  # fmt: skip


def test_imagenet_weights_with_the_papers_scaling_warn() -> None:
    paper = make_config("paper")
    assert (paper.pretrained, paper.scaling) == ("imagenet", "unit")
    message = paper.scaling_warning()
    assert message is not None and "expect scaling 'symmetric'" in message and "'unit'" in message
    assert make_config("paper", scaling="symmetric").scaling_warning() is None
    assert make_config("cpu").scaling_warning() is None  # from scratch: nothing to mismatch
