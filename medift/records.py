"""The normalised record and question that every dataset adapter yields.

Adapters (one per dataset, real and synthetic data alike) turn a raw release into
`Record`s; the dataset's rules turn a record into a description and, for val/test,
into `Question`s. Everything downstream (shards, training, evaluation) only sees these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    dataset: str
    image_id: str  # unique within the dataset; used as the shard key
    image_path: str  # absolute path of the raw image file
    patient_id: str  # a split never holds a patient that another split holds
    split: str  # one of SPLITS
    attributes: dict[str, str] = field(default_factory=dict)  # normalised key -> value
    source: str = ""  # "file:row" the record came from, for error messages


@dataclass(frozen=True)
class Question:
    image_id: str
    attribute: str  # the attribute key the question asks about
    question: str  # e.g. "What is the cell size?"
    options: tuple[str, ...]
    answer_index: int

    def __post_init__(self):
        if not 2 <= len(self.options) <= 26:
            raise ValueError(f"question on {self.image_id!r} has {len(self.options)} options")
        if not 0 <= self.answer_index < len(self.options):
            raise ValueError(f"question on {self.image_id!r}: answer index out of range")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"question on {self.image_id!r}: duplicated options {self.options}")
