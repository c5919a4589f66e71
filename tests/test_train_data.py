import collections
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from medift import engine, shards
from medift.records import Record
from medift.shards import DESCRIPTIONS, ShardRows, write_shards
from medift.train import DescriptionSamples, TrainConfig, epoch_batches, epoch_steps

REPO = Path(__file__).resolve().parents[1]


EMBEDDED = REPO / "models" / "embedded-mllama"


@pytest.fixture(scope="module")
def embedded_processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(EMBEDDED)


def _samples(shards: Path, processor, shuffle: bool, seed: int = 1) -> DescriptionSamples:
    return DescriptionSamples(str(shards), processor, "Describe the image.", shuffle=shuffle, seed=seed, window=16)


def _phrases(text: str) -> list[str]:
    return [p.strip() for p in text.split(",")]


def _response_of(samples: DescriptionSamples, index: int, load_count: int) -> str:
    """The assistant response the training sample holds: its label tokens, decoded."""
    encoded, _image = samples[(index, load_count)]
    tokens = [t for t in encoded.labels if t != -100]
    return samples.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_response_shuffling_permutes_phrases_and_differs_between_loads(tiny_wbcatt_shards, embedded_processor):
    samples = _samples(tiny_wbcatt_shards, embedded_processor, shuffle=True)
    description = samples.rows.row(0)["description"]
    responses = {_response_of(samples, 0, load) for load in range(1, 13)}
    assert len(responses) > 5  # 11 phrases: 11! orders
    for response in responses:
        assert sorted(_phrases(response)) == sorted(_phrases(description))


def test_response_shuffling_is_deterministic_for_a_seed(tiny_wbcatt_shards, embedded_processor):
    one, same = (_samples(tiny_wbcatt_shards, embedded_processor, True) for _ in range(2))
    other_seed = _samples(tiny_wbcatt_shards, embedded_processor, True, seed=2)
    assert _response_of(one, 1, 3) == _response_of(same, 1, 3)
    assert _response_of(one, 1, 3) != _response_of(other_seed, 1, 3)


def test_no_shuffle_keeps_the_description(tiny_wbcatt_shards, embedded_processor):
    samples = _samples(tiny_wbcatt_shards, embedded_processor, shuffle=False)
    for index in range(len(samples)):
        assert _response_of(samples, index, 7) == samples.rows.row(index)["description"]


@pytest.mark.parametrize("groups,window", [([10], 16), ([3, 3, 3, 1], 2), ([2, 2, 2, 2, 2], 1)])
def test_epoch_batches_cover_every_sample_repeat_times(groups, window):
    batches = epoch_batches(groups, 4, repeat=3, seed=1, epoch=0, window=window)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == sorted(list(range(10)) * 3)
    assert batches == epoch_batches(groups, 4, repeat=3, seed=1, epoch=0, window=window)  # seeded: rebuilt on resume
    assert batches != epoch_batches(groups, 4, repeat=3, seed=1, epoch=1, window=window)


def whole_split_order(n: int, batch_size: int, repeat: int, seed: int, epoch: int) -> list[list[int]]:
    """The order before windows existed (one seeded shuffle of the whole split)."""
    order = [i for _ in range(repeat) for i in range(n)]
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("seed,epoch,repeat", [(1, 0, 1), (1, -1, 1), (2, 4, 3), (7, 1, 2)])
def test_a_split_within_one_window_keeps_the_whole_split_order(seed, epoch, repeat):
    """300 rows in 64-row groups (the embedded datasets' training splits) fit the default window:
    the order, hence the default table, is what it was before windows existed."""
    groups = [64, 64, 64, 64, 44]
    assert epoch_batches(groups, 16, repeat, seed, epoch, window=16) == whole_split_order(300, 16, repeat, seed, epoch)
    assert epoch_batches(groups, 16, repeat, seed, epoch, window=5) == whole_split_order(300, 16, repeat, seed, epoch)


def test_the_default_window_holds_every_embedded_training_split():
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    window = default["train"]["shuffle_window"]
    assert window == TrainConfig(shards="x", base_model="y", out_dir="z").shuffle_window
    for name, dataset in default["datasets"].items():
        assert dataset["synthetic"]["n_train"] <= window * shards.ROW_GROUP_SIZE, name


@pytest.fixture
def many_row_groups(tmp_path, monkeypatch) -> Path:
    """A real shard directory whose training split has 24 row groups of 8 rows, in 3 files."""
    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 8)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    records = [Record("toy", f"i{i:03d}", str(image), f"p{i}", "train", {"a": "b"}, "toy.csv") for i in range(192)]
    write_shards(records, {r.image_id: "a, b" for r in records}, {}, tmp_path / "shards", 8, rows_per_shard=64)
    return tmp_path / "shards"


def reads_per_group(
    shard_dir: Path, config: TrainConfig, cache: int, ranks: int, epochs: int, monkeypatch
) -> list[collections.Counter]:
    """(rank, file, row group) -> times decoded in each epoch, every rank reading its own
    micro-batches through a reader that caches `cache` row groups."""
    decoded = collections.Counter()
    real = ShardRows._read_group

    def counted(self, file, group):
        if (file, group) not in self._cache:
            decoded[self.rank, file, group] += 1
        return real(self, file, group)

    monkeypatch.setattr(ShardRows, "_read_group", counted)
    monkeypatch.setattr(engine, "world_size", lambda: ranks)
    readers = [ShardRows(shard_dir, DESCRIPTIONS, "train", ("description",), cached_groups=cache) for _ in range(ranks)]
    groups = readers[0].group_sizes()
    per_epoch = []
    for epoch in range(epochs):
        decoded.clear()
        for rank, reader in enumerate(readers):
            reader.rank = rank
            monkeypatch.setattr(engine, "rank", lambda rank=rank: rank)
            for step in epoch_steps(groups, config, epoch, epoch):
                for micro in step:
                    for index, _ in micro:
                        reader.row(index)
        per_epoch.append(collections.Counter(decoded))
    return per_epoch


def test_each_rank_reads_each_row_group_once_per_epoch(many_row_groups, monkeypatch):
    """24 row groups, windows of 4 cached by each reader, 2 ranks, repeat 2: each rank decodes
    each row group once per epoch. The same 4-group cache under a whole-split shuffle decodes
    a row group about once per sample read from it."""
    assert ShardRows(many_row_groups, DESCRIPTIONS, "train", ("description",)).group_sizes() == [8] * 24
    settings = dict(shards="x", base_model="y", out_dir="z", batch_size=2, gradient_accumulation=2, repeat_train=2)
    windowed = TrainConfig(**settings, shuffle_window=4)
    for reads in reads_per_group(many_row_groups, windowed, cache=4, ranks=2, epochs=2, monkeypatch=monkeypatch):
        assert len(reads) == 2 * 24 and max(reads.values()) == 1
    whole = TrainConfig(**settings, shuffle_window=24)
    (reads,) = reads_per_group(many_row_groups, whole, cache=4, ranks=2, epochs=1, monkeypatch=monkeypatch)
    assert sorted(reads.values())[len(reads) // 2] >= 4  # the median group: decoded again and again
