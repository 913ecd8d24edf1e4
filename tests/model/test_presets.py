"""The paper's Table 3 presets have the published parameter counts (built on meta, no memory)."""

from __future__ import annotations

import pytest
import torch

from dlcm.model.presets import PRESETS, build_model, preset_config
from dlcm.train.materialize import count_parameters


@pytest.mark.parametrize(("name", "billions"), [("baseline_1.3b", 1.30), ("dlcm_2.3b", 2.3)])
def test_paper_presets_match_table_3(name: str, billions: float) -> None:
    with torch.device("meta"):
        model = build_model(preset_config(name))
    assert count_parameters(model) == pytest.approx(billions * 1e9, rel=0.03)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name: str) -> None:
    with torch.device("meta"):
        build_model(preset_config(name))
