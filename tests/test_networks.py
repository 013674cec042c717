"""The network registry's entries: one per network, data only, the single source of the per-network defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from covid_cxr.config import SCALINGS
from covid_cxr.errors import ConfigError
from covid_cxr.networks import (
    IMAGENET_FILES,
    NETWORKS,
    network_entry,
    pretrained_scaling_warning,
)


def test_every_network_has_a_complete_entry() -> None:
    assert list(NETWORKS) == ["concat", "xception", "resnet50v2"]
    assert network_entry("concat").backbones == ("xception", "resnet50v2")  # Xception's map first, as the authors
    assert {n: e.paper_batch_size for n, e in NETWORKS.items()} == {"concat": 20, "xception": 30, "resnet50v2": 30}
    for name, entry in NETWORKS.items():
        assert entry.name == name and entry.image_size == 300
        assert [f.backbone for f in entry.imagenet] == list(entry.backbones)
        assert entry.imagenet_scaling in SCALINGS
        assert entry.optimizer.name == "nadam" and entry.optimizer.eps == 1e-7
    assert set(IMAGENET_FILES) == {"xception", "resnet50v2"}


@pytest.mark.parametrize("network", list(NETWORKS))
def test_scaling_mismatch_is_named_only_when_it_is_one(network: str) -> None:
    message = pretrained_scaling_warning(network, "imagenet", "unit")
    assert message is not None and network in message and "scaling: symmetric" in message
    assert pretrained_scaling_warning(network, "imagenet", "symmetric") is None
    assert pretrained_scaling_warning(network, "none", "unit") is None


def test_unknown_network_names_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown network 'xceptoin' \(did you mean 'xception'\?\); valid networks"):
        network_entry("xceptoin")


def test_the_entries_load_without_torch() -> None:
    code = "import sys, covid_cxr.networks, covid_cxr.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
