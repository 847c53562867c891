"""TOFU data: loading (hub or local JSON-lines folder), QA tokenisation, collation, forget/retain pairing.

Rows follow ``shared/spec/METRICS.md`` (TOFU): ``{"question", "answer"}``, plus ``"paraphrased_answer"`` (str)
and ``"perturbed_answer"`` (list of str) in ``*_perturbed`` configs (real_authors / world_facts have no
paraphrase: their answer plays that role).

Tokenisation of one QA pair (``encode_qa``): ``prompt`` = the template's rendering of the question,
``answer`` = answer prefix + answer text, tokenised separately and concatenated, then one EOS:

    input_ids      = prompt_ids + answer_ids + [eos]
    labels         = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [eos]     (unshifted, Hugging Face style)
    attention_mask = [1] * len(input_ids)

Padding (``pad_collate``) builds the attention mask from the true lengths, never from ``input_ids != pad``, so
the answer's EOS keeps attention 1 and label ``eos`` when ``pad_token_id == eos_token_id``. Training pads on the
right; generation prompts (``encode_prompt`` + ``pad_collate(padding_side="left")``) on the left.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import torch

from fastweight._constants import IGNORE_INDEX
from fastweight.data.schema import check_rows, read_json_rows
from fastweight.data.templates import REFUSALS, PromptTemplate, get_template, render_prompt

FORGET_PERCENTS: tuple[int, ...] = (1, 5, 10)
Split = Literal["forget01", "forget05", "forget10"]
SPLITS: tuple[str, ...] = get_args(Split)

_QA = ("question", "answer")
_PERTURBED = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_GENERAL = ("question", "answer", "perturbed_answer")
TOFU_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "full": _QA,
    **{f"forget{p:02d}": _QA for p in FORGET_PERCENTS},
    **{f"forget{p:02d}_perturbed": _PERTURBED for p in FORGET_PERCENTS},
    **{f"retain{100 - p:02d}": _QA for p in FORGET_PERCENTS},
    "retain_perturbed": _PERTURBED,
    "real_authors": _QA, "real_authors_perturbed": _GENERAL,
    "world_facts": _QA, "world_facts_perturbed": _GENERAL,
    **{f"holdout{p:02d}": _QA for p in FORGET_PERCENTS},
}
# Fields some configs carry but not every copy of the data has: TOFU's ``paraphrased_question`` (open-unlearning's
# ``question_key`` switch evaluates on it); checked only when a run asks for it.
TOFU_OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    **{f"forget{p:02d}_perturbed": ("paraphrased_question",) for p in FORGET_PERCENTS},
    "retain_perturbed": ("paraphrased_question",),
}


def split_configs(split: str) -> dict[str, str]:
    """Config names used for one forget split: forget, retain, the perturbed evaluation sets, and the holdout
    set of the same size (TOFU's ``holdoutXX``: authors never trained on; MIA / PrivLeak non-members)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pct = int(split[len("forget"):])
    return {"forget": split, "retain": f"retain{100 - pct:02d}", "forget_eval": f"{split}_perturbed",
            "retain_eval": "retain_perturbed", "real_authors_eval": "real_authors_perturbed",
            "world_facts_eval": "world_facts_perturbed", "holdout": f"holdout{pct:02d}"}


def load_tofu(source: str | os.PathLike, config: str) -> list[dict]:
    """Rows of one TOFU config.

    Args:
        source: a local folder holding ``<config>.json`` (JSON lines, or one JSON array), or a dataset name
            for ``datasets.load_dataset(source, config, split="train")`` (e.g. ``"locuslab/TOFU"``).
        config: a config name (``TOFU_CONFIG_FIELDS`` lists the known ones).
    Returns:
        a list of dicts with at least the fields of ``TOFU_CONFIG_FIELDS[config]`` (extra hub fields kept).
    """
    path = Path(source)
    if path.is_dir():
        file = path / f"{config}.json"
        if not file.is_file():
            raise ValueError(f"source folder {str(path)!r} has no {file.name!r} for config {config!r}")
        rows = read_json_rows(file)
        where = str(file)
    elif path.suffix in (".json", ".jsonl") or path.exists():
        raise ValueError(f"source must be a folder of <config>.json files or a dataset name, got {str(path)!r}")
    else:
        import datasets  # lazy: only the hub path needs it

        rows = [dict(r) for r in datasets.load_dataset(str(source), config, split="train")]
        where = f"{source}:{config}"
    # field types too (a list question, an empty perturbed_answer): errors name the file, row and field
    return check_rows(rows, TOFU_CONFIG_FIELDS.get(config, _QA), where)


def _answer_ids(tokenizer, template: PromptTemplate, answer: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; labels need one EOS after the answer")
    return list(tokenizer(template.answer_prefix + answer, add_special_tokens=False)["input_ids"]) + \
        [tokenizer.eos_token_id]


def encode_prompt(tokenizer, template: PromptTemplate | str, question: str) -> list[int]:
    """Token ids of the rendered prompt (BOS added by the tokenizer unless the template already has it)."""
    template = get_template(template) if isinstance(template, str) else template
    text = render_prompt(template, question, tokenizer)
    return list(tokenizer(text, add_special_tokens=not template.uses_special_tokens)["input_ids"])


def encode_qa(tokenizer, template: PromptTemplate | str, question: str, answer: str,
              max_length: int = 512) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask``, ``labels`` (unshifted) of one QA pair; see the module docstring.

    Longer pairs are cut to ``max_length``: the answer is cut first (its last kept token is still EOS); a
    prompt that leaves fewer than 2 positions keeps its last tokens.
    """
    if max_length < 4:
        raise ValueError(f"max_length must be >= 4, got {max_length}")
    template = get_template(template) if isinstance(template, str) else template
    prompt = encode_prompt(tokenizer, template, question)
    answer = _answer_ids(tokenizer, template, answer)
    if len(prompt) > max_length - 2:
        prompt = prompt[len(prompt) - (max_length - 2):]
    room = max_length - len(prompt)
    if len(answer) > room:
        answer = answer[:room - 1] + [answer[-1]]
    ids = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + answer}


def answer_token_lengths(tokenizer, template: PromptTemplate | str, rows: Sequence[dict],
                         answer_key: str = "answer") -> list[int]:
    """Tokens of each row's answer as the model sees it (answer prefix + text, without the EOS)."""
    template = get_template(template) if isinstance(template, str) else template
    return [len(_answer_ids(tokenizer, template, r[answer_key])) - 1 for r in rows]


def answer_cut_tokens(tokenizer, template: PromptTemplate | str, rows: Sequence[dict], max_length: int,
                      answer_key: str = "answer") -> list[int]:
    """Per row, how many answer tokens (EOS included) ``encode_qa(..., max_length)`` drops (0 = none)."""
    template = get_template(template) if isinstance(template, str) else template
    out = []
    for r in rows:
        full = len(_answer_ids(tokenizer, template, r[answer_key]))
        kept = sum(1 for t in encode_qa(tokenizer, template, r["question"], r[answer_key], max_length)["labels"]
                   if t != IGNORE_INDEX)
        out.append(full - kept)
    return out


class TokenizedDataset(torch.utils.data.Dataset):
    """Pre-tokenised items (``self.items``: dicts of int lists); ``__getitem__`` only indexes.

    Item: dict of 1-D int64 tensors plus ``index`` (0-d int64, the item number).
    """

    items: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v, dtype=torch.long) for k, v in self.items[i].items()}
        item["index"] = torch.tensor(i, dtype=torch.long)
        return item


class QADataset(TokenizedDataset):
    """Tokenised QA rows (pre-tokenised once; ``__getitem__`` only indexes).

    Item: dict of 1-D int64 tensors ``input_ids``, ``attention_mask``, ``labels`` (length <= max_length),
    plus ``index`` (0-d int64, the row number).
    """

    def __init__(self, rows: Sequence[dict], tokenizer, template: PromptTemplate | str = "chat",
                 max_length: int = 512, answer_key: str = "answer") -> None:
        self.rows, self.tokenizer, self.template, self.max_length = list(rows), tokenizer, template, max_length
        self.items = [encode_qa(tokenizer, template, r["question"], r[answer_key], max_length) for r in self.rows]


def pad_collate(features: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Stack items of ``QADataset`` (or nested ``{"forget": item, "retain": item}`` pairs) into a batch.

    Every key ending in ``input_ids`` is padded with ``pad_token_id``, ``attention_mask`` and ``token_weights``
    with 0, ``labels`` with ``IGNORE_INDEX`` (so ``idk_input_ids`` etc. are handled too); 0-d tensors are stacked. The attention
    mask comes from the items, so pad == eos never hides the answer's EOS. Returns [B, T_max] int64 tensors.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("features must be a non-empty sequence")
    first = features[0]
    if all(isinstance(v, dict) for v in first.values()):
        return {k: pad_collate([f[k] for f in features], pad_token_id, padding_side) for k in first}
    out = {}
    for key in first:
        values = [f[key] for f in features]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        fill = (IGNORE_INDEX if key.endswith("labels") else 0 if key.endswith(("attention_mask", "token_weights"))
                else pad_token_id)
        width = max(v.shape[0] for v in values)
        batch = torch.full((len(values), width), fill, dtype=values[0].dtype)
        for i, v in enumerate(values):
            if padding_side == "right":
                batch[i, :v.shape[0]] = v
            else:
                batch[i, width - v.shape[0]:] = v
        out[key] = batch
    return out


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby (seed, rank, epoch, i) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Forget items paired with a retain item (and, optionally, a refusal answer for FLAT / IdkDPO).

    ``len`` = number of forget items; the loader's sampler (sharded across processes by accelerate) decides
    which forget items a rank sees. The retain item and the refusal of forget item ``i`` are drawn from a
    ``torch.Generator`` seeded with ``(seed, rank, epoch, i)``: per rank, per epoch, reproducible after a
    resume, and never from the global RNG. Item: ``{"forget": {input_ids, attention_mask, labels, index
    [, idk_input_ids, idk_attention_mask, idk_labels]}, "retain": {...}}`` ("retain" absent without a retain set).
    """

    def __init__(self, forget: QADataset, retain: QADataset | None = None, *, seed: int = 0, rank: int = 0,
                 refusals: Sequence[str] | None = None) -> None:
        if len(forget) == 0:
            raise ValueError("forget must hold at least one item")
        if retain is not None and len(retain) == 0:
            raise ValueError("retain must be None or hold at least one item")
        self.forget, self.retain, self.seed, self.rank, self.epoch = forget, retain, seed, rank, 0
        self.idk: list[list[dict]] | None = None
        if refusals is not None:
            if not refusals:
                raise ValueError("refusals must be None or hold at least one refusal text")
            self.idk = [[encode_qa(forget.tokenizer, forget.template, r["question"], text, forget.max_length)
                         for text in refusals] for r in forget.rows]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.rank, self.epoch, i))
        item = {"forget": self.forget[i]}
        if self.idk is not None:
            choice = self.idk[i][int(torch.randint(len(self.idk[i]), (1,), generator=gen))]
            item["forget"].update({f"idk_{k}": torch.tensor(v, dtype=torch.long) for k, v in choice.items()})
        if self.retain is not None:
            item["retain"] = self.retain[int(torch.randint(len(self.retain), (1,), generator=gen))]
        return item


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a shuffled order that depends only on ``(seed, epoch)``.

    The permutation of ``0..n-1`` is the same on every rank; it is cut to a multiple of ``world`` (at most
    ``world - 1`` items, different ones each epoch, are left out) and rank r takes positions r, r + world, ...
    So ranks see disjoint items and equal counts (no duplicated data, no rank waiting on another), and a
    resumed run replays the same order. ``shuffle=False`` keeps the identity order.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}")
        if n < world:
            raise ValueError(f"n ({n}) must be >= world ({world}): every rank needs at least one item")
        self.n, self.seed, self.shuffle, self.rank, self.world, self.epoch = n, seed, shuffle, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self) -> Iterator[int]:
        order = torch.arange(self.n)
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        order = order[:self.n - self.n % self.world]
        return iter(order[self.rank::self.world].tolist())


__all__ = ["EpochSampler", "FORGET_PERCENTS", "ForgetRetainDataset", "QADataset", "TokenizedDataset", "REFUSALS", "SPLITS", "Split",
           "TOFU_CONFIG_FIELDS", "TOFU_OPTIONAL_FIELDS", "answer_cut_tokens", "answer_token_lengths", "encode_prompt", "encode_qa", "load_tofu", "pad_collate", "split_configs"]
