"""The shipped base model is what the pipeline's pre-training rule produces."""

import json
from pathlib import Path

import pytest

from medift.model.embedded import EmbeddedModelConfig
from medift.model.pretrain import PretrainConfig, pretrain

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "embedded-base"


def test_pretraining_is_deterministic_on_cpu():
    config = PretrainConfig(text_steps=2, mixed_steps=2, batch_size=4, eval_questions=4, eval_every=0, threads=1)
    first = pretrain(config, EmbeddedModelConfig(), stop_after=4)["history"]
    second = pretrain(config, EmbeddedModelConfig(), stop_after=4)["history"]
    assert first == second
    assert first[-1]["aux_loss"] > 0  # the mixed phase (images) was reached


@pytest.mark.skipif(not (SHIPPED / "pretrain_history.json").exists(), reason="no shipped base model")
def test_shipped_weights_come_from_this_pretraining_code():
    shipped = json.loads((SHIPPED / "pretrain_history.json").read_text())
    config = PretrainConfig(**shipped["config"])
    model_config = EmbeddedModelConfig(**shipped["model_config"])
    rerun = pretrain(config, model_config, stop_after=3)["history"]
    for ours, theirs in zip(rerun, shipped["history"][:3]):
        # Losses are rounded to 5 decimals; thread count may change float summation order.
        assert ours["lm_loss"] == pytest.approx(theirs["lm_loss"], abs=2e-3)


@pytest.mark.skipif(not (SHIPPED / "pretrain_history.json").exists(), reason="no shipped base model")
def test_rule_defaults_rebuild_the_shipped_model():
    """`--forcerun pretrain_base_model` passes only out_dir, seed, image size and threads."""
    from dataclasses import asdict

    shipped = json.loads((SHIPPED / "pretrain_history.json").read_text())
    defaults = asdict(PretrainConfig())
    for key, value in shipped["config"].items():
        if key not in ("out_dir", "threads"):
            assert defaults[key] == value, key
    assert asdict(EmbeddedModelConfig()) == shipped["model_config"]
