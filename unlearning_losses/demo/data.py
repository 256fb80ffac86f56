"""A generated corpus of question-answer facts about fictitious people (in the spirit of TOFU).

Every person has a two-token name and one answer per attribute. Each question is a short token
sequence ``<bos> what is the ATTRIBUTE of FIRST LAST ? ANSWER <eos>``; its labels follow the
Hugging Face convention: the answer's token id at the answer, ``-100`` everywhere else.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from torch import Tensor

ATTRIBUTES = {
    "city": [
        "arvel",
        "brisk",
        "coldmere",
        "dunhall",
        "elmsby",
        "fenwick",
        "galt",
        "harrow",
        "ivybridge",
        "jarrow",
        "kelso",
        "lydd",
    ],
    "job": [
        "baker",
        "cartographer",
        "diver",
        "engraver",
        "falconer",
        "glazier",
        "herbalist",
        "luthier",
        "mason",
        "navigator",
        "potter",
        "weaver",
    ],
    "color": [
        "amber",
        "cobalt",
        "crimson",
        "ivory",
        "jade",
        "ochre",
        "plum",
        "rust",
        "slate",
        "teal",
    ],
    "pet": [
        "badger",
        "canary",
        "ferret",
        "gecko",
        "hare",
        "heron",
        "newt",
        "otter",
        "raven",
        "tortoise",
    ],
}
#: The one answer no fact has, never seen in training: the refusal that JensUn and FLAT train the
#: forget questions toward.
REFUSAL = "unknown"
TEMPLATE = ["<pad>", "<bos>", "<eos>", "what", "is", "the", "of", "?", REFUSAL]
SYLLABLES = ["ka", "lo", "mi", "ro", "ta", "ve", "zu", "ne", "sa", "di", "fo", "gu", "ba", "ri"]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Split:
    """Questions as padded token ids and labels, with the answer's position in each row."""

    input_ids: Tensor
    labels: Tensor
    answer_position: Tensor
    answers: Tensor


@dataclass(frozen=True)
class Corpus:
    vocab: list[str]
    retain: Split
    forget: Split

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def refusal_labels(self) -> Tensor:
        """The forget set's labels with every answer replaced by the refusal."""
        labels = self.forget.labels
        return labels.masked_fill(labels != IGNORE_INDEX, self.vocab.index(REFUSAL))


def make_corpus(people: int, forget_people: int, seed: int) -> Corpus:
    """``people`` fictitious people with random facts; the last ``forget_people`` form the forget set."""
    rng = random.Random(seed)
    words = ["".join(p) for p in itertools.product(SYLLABLES, repeat=2)]
    rng.shuffle(words)
    firsts, lasts = words[:people], words[people : 2 * people]
    values = sorted({v for vs in ATTRIBUTES.values() for v in vs})
    vocab = TEMPLATE + list(ATTRIBUTES) + values + firsts + lasts
    index = {word: i for i, word in enumerate(vocab)}

    questions = []
    for first, last in zip(firsts, lasts, strict=True):
        facts = [(attribute, rng.choice(options)) for attribute, options in ATTRIBUTES.items()]
        questions.append(
            [
                ["<bos>", "what", "is", "the", a, "of", first, last, "?", v, "<eos>"]
                for a, v in facts
            ]
        )
    cut = people - forget_people
    retain = [q for person in questions[:cut] for q in person]
    forget = [q for person in questions[cut:] for q in person]
    return Corpus(vocab, _encode(retain, index), _encode(forget, index))


def _encode(questions: list[list[str]], index: dict[str, int]) -> Split:
    ids = torch.tensor([[index[w] for w in q] for q in questions])
    answer_position = torch.full((len(questions),), len(questions[0]) - 2)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -2] = ids[:, -2]  # the answer
    return Split(ids, labels, answer_position, ids[torch.arange(len(ids)), answer_position])
