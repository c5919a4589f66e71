"""Validation shared out over the ranks (medift.train.Validation): two torchrun-started CPU
ranks (gloo) on a tiny Mllama checkpoint each score their share of the validation questions
and sum the correct answers; the accuracy must equal the one of every question scored on one
rank, exactly (the counts are integers; each question's letter is the same whichever rank,
batch or padding it is scored in).

The shards hold 4 rows per file, so the split has several row groups of an odd size: a rank's
share is padded in some of them (the same number of forwards on every rank, as ZeRO-3 needs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medift.settings import launcher_arguments

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, time
from medift import engine
from medift.evaluate import score_questions
from medift.model.loading import load_base_model
from medift.train import Validation

checkpoint, shards, out = sys.argv[1:4]
engine.init_distributed()
model, processor = load_base_model(checkpoint)
validation = Validation(shards, batch_size=2)
started = time.perf_counter()
sharded = validation.accuracy(model, processor, None)
seconds = time.perf_counter() - started
# Every question on this rank alone: the unsharded accuracy.
correct = sum(int(score_questions(model, processor, frame, validation.config)["correct"].sum())
              for frame in validation.reader.row_groups())
result = {"sharded": sharded, "unsharded": round(100 * correct / len(validation.reader), 2),
          "questions": len(validation.reader), "ranks": engine.world_size(), "seconds": seconds}
open(f"{out}-rank{engine.rank()}.json", "w").write(json.dumps(result))
engine.shutdown()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint
    from tests.fixtures.data import synthetic_shards

    root = tmp_path_factory.mktemp("validation-ranks")
    synthetic_shards(root, seed=3, n_train=4, n_val=15, n_test=2, rows_per_shard=4)
    (root / "validate.py").write_text(SCRIPT)
    return root, build_tiny_checkpoint("mllama", root / "mllama"), root / "shards"


def run_validation(setup, ranks: int) -> list[dict]:
    root, checkpoint, shards = setup
    out = root / f"ranks{ranks}"
    launcher = launcher_arguments(ranks, [str(root / "validate.py")], python=sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [*launcher, str(checkpoint), str(shards), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(Path(f"{out}-rank{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.slow
def test_two_ranks_validate_their_shares_to_the_unsharded_accuracy(setup):
    (one,) = run_validation(setup, 1)
    two = run_validation(setup, 2)
    assert one["questions"] >= 10
    assert [r["ranks"] for r in two] == [2, 2]
    # Exact: integer counts of the same letters.
    assert {r["sharded"] for r in two} == {r["unsharded"] for r in two} == {one["unsharded"]} == {one["sharded"]}
