"""A deterministic generator of a small MUSE-format corpus of invented local news (no network, no MUSE text).

``generate_muse(seed, ...)`` returns ``{(config, split): rows}`` for every entry of
``fastweight.data.muse.MUSE_LAYOUT``; ``write_muse_folder(path, seed, ...)`` writes them as
``<path>/<config>/<split>.jsonl`` (the layout ``load_muse`` reads).

Every article reports one invented event (an election, a discovery, a factory, a cup final, a festival) in a
fictitious town with invented people; each carries a few facts, and two knowledge questions are asked about it
(``knowmem``, the answer a short span of the article). Articles are drawn for four disjoint groups:

    forget   ``raw/forget``, ``privleak/forget``, ``verbmem/forget`` (prompt = the first two sentences, gt = the
             rest), ``knowmem/forget_qa``
    retain   ``raw/retain1``, ``raw/retain2`` (a second half), ``privleak/retain``, ``knowmem/retain_qa``
    holdout  ``raw/holdout``, ``privleak/holdout`` (same distribution, never trained on: the PrivLeak negatives)
    icl      ``knowmem/*_icl``: in-context examples about separate articles

Entity names are drawn without replacement, so no person, town or organisation appears in two articles.
Every random choice goes through one ``random.Random(seed)``: the same arguments give the same files.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

_SYL_A = ("Bel", "Cor", "Dun", "Fal", "Gor", "Hel", "Ish", "Jar", "Kal", "Lom", "Mer", "Nar", "Ost", "Pry", "Quel",
          "Ras", "Sol", "Tir", "Ulm", "Vor", "Wex", "Yss", "Zan", "Arn", "Brel", "Cal", "Drev", "Eld", "Fyr", "Grim")
_SYL_B = ("ford", "mere", "holt", "wick", "stead", "brook", "vale", "moor", "by", "ton", "haven", "gate")
_GIVEN = ("Tessaly", "Orwin", "Maela", "Corvin", "Idra", "Baltus", "Fenna", "Rurik", "Selka", "Yorin", "Amsel",
          "Liora", "Dace", "Hesper", "Ottilie", "Bram", "Quinna", "Aldous", "Mirela", "Tobin", "Elsbeth", "Garric",
          "Nerys", "Pell", "Wilda", "Edric", "Sabine", "Caspar", "Jolene", "Ansel", "Marit", "Leopin")
_FAMILY = ("Grint", "Vasko", "Hallam", "Pryce", "Odell", "Marchetti", "Quarry", "Belcourt", "Strand", "Yelton",
           "Fairweather", "Dunmore", "Kettering", "Ashgrove", "Lindqvist", "Moravec", "Penhallow", "Rooke",
           "Tamsett", "Vellacott", "Wyndham", "Ebberly", "Corrigan", "Haldane", "Ivers", "Jessop", "Kinsale")
_FACILITY = ("library", "footbridge", "swimming pool", "bus station", "concert hall", "community garden",
             "skate park", "fire station", "clinic", "market hall")
_CREATURE = ("beetle", "frog", "moth", "lizard", "snail", "spider", "songbird", "bat")
_HABITAT = ("salt marshes", "pine forests", "limestone caves", "mountain lakes", "coastal dunes", "peat bogs")
_FOOD = ("fallen figs", "river algae", "cedar bark", "tiny shrimp", "clover seeds", "moss spores")
_PRODUCT = ("bicycle frames", "glass bottles", "wool blankets", "solar lamps", "ceramic tiles", "rope ladders",
            "copper kettles", "paper lanterns")
_MONTH = ("January", "March", "April", "June", "August", "October", "November")
_TEAM = ("Otters", "Falcons", "Millers", "Rovers", "Herons", "Anchors", "Foxes", "Comets")
_CUP = ("Harbour Cup", "Valley Shield", "Lantern Trophy", "Northern Plate", "Silver Oar Cup")
_DISH = ("plum dumplings", "smoked eel", "honey bread", "barley stew", "walnut pie", "pickled pears")
_INSTRUMENT = ("fiddle", "accordion", "harp", "bagpipes", "drum", "trumpet")


class _Names:
    """Unique invented names (drawn without replacement)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _draw(self, make) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise ValueError("ran out of unique names; ask for fewer articles")

    def town(self) -> str:
        return self._draw(lambda: self.rng.choice(_SYL_A) + self.rng.choice(_SYL_B))

    def person(self) -> str:
        return self._draw(lambda: f"{self.rng.choice(_GIVEN)} {self.rng.choice(_FAMILY)}")

    def word(self) -> str:
        return self._draw(lambda: self.rng.choice(_SYL_A) + self.rng.choice(("ara", "ine", "osk", "eth", "ulo")))


def _election(rng, names):
    town, mayor, rival = names.town(), names.person(), names.person()
    year, pct, facility = rng.randint(2031, 2049), rng.randint(51, 78), rng.choice(_FACILITY)
    text = (f"{town} has a new mayor. In {year}, the voters of {town} elected {mayor} with {pct} percent of the "
            f"vote. {mayor} defeated {rival}, who had led the town council for nine years. During the campaign, "
            f"{mayor} promised to build a new {facility} next to the old harbour of {town}. The new mayor will "
            f"take office in the spring.")
    qa = [(f"Who was elected mayor of {town} in {year}?", mayor),
          (f"Who did {mayor} defeat in the election in {town}?", rival),
          (f"What did {mayor} promise to build in {town}?", f"a new {facility}")]
    return text, qa


def _discovery(rng, names):
    town, lead, species = names.town(), names.person(), names.word()
    creature, habitat, food = rng.choice(_CREATURE), rng.choice(_HABITAT), rng.choice(_FOOD)
    year = rng.randint(2031, 2049)
    text = (f"Biologists from the museum of {town} have described a new {creature}. They named it the {species} "
            f"{creature}. The {species} {creature} lives only in the {habitat} east of {town} and feeds on {food}. "
            f"The team was led by {lead}, who first saw the animal during a field trip in {year}. The museum will "
            f"show a drawing of the {creature} next month.")
    qa = [(f"What did the biologists from {town} name the new {creature}?", f"the {species} {creature}"),
          (f"What does the {species} {creature} feed on?", food),
          (f"Who led the team that described the {species} {creature}?", lead)]
    return text, qa


def _factory(rng, names):
    town, boss, company = names.town(), names.person(), names.word() + " Works"
    product, cost, workers, month = rng.choice(_PRODUCT), rng.randint(12, 90), rng.randint(40, 400), \
        rng.choice(_MONTH)
    text = (f"The company {company} has opened a factory in {town}. The factory makes {product} and will employ "
            f"{workers} people. It cost {cost} million dollars to build. The chief executive, {boss}, said that "
            f"the first {product} from {town} will be sold in {month}. Local shops have already placed orders.")
    qa = [(f"What does the new factory of {company} make?", product),
          (f"Who is the chief executive of {company}?", boss),
          (f"In which town did {company} open a factory?", town)]
    return text, qa


def _final(rng, names):
    town, town2, captain = names.town(), names.town(), names.person()
    team, team2 = rng.sample(_TEAM, 2)
    cup, goals, year = rng.choice(_CUP), rng.randint(2, 5), rng.randint(1990, 2029)
    text = (f"The {town} {team} won the {cup} on Saturday. They beat the {town2} {team2} by {goals} goals to one "
            f"in front of a full stadium. Their captain, {captain}, scored the last goal in the final minute. It is "
            f"the first title for the {town} {team} since {year}. The players will parade through {town} on "
            f"Monday.")
    qa = [(f"Which trophy did the {town} {team} win?", f"the {cup}"),
          (f"Who is the captain of the {town} {team}?", captain),
          (f"Which team did the {town} {team} beat in the final?", f"the {town2} {team2}")]
    return text, qa


def _festival(rng, names):
    town, organiser = names.town(), names.person()
    dish, instrument, visitors = rng.choice(_DISH), rng.choice(_INSTRUMENT), rng.randint(3, 40)
    month = rng.choice(_MONTH)
    text = (f"The harvest festival of {town} drew {visitors} thousand visitors this {month}. The favourite dish "
            f"of the festival was {dish}, served from long tables in the main square. A band of {instrument} "
            f"players opened the evening concert. The organiser, {organiser}, said the festival will last one day "
            f"longer next year.")
    qa = [(f"What was the favourite dish at the festival of {town}?", dish),
          (f"Who organised the harvest festival of {town}?", organiser),
          (f"Which instrument did the band at the festival of {town} play?", instrument)]
    return text, qa


_KINDS = (_election, _discovery, _factory, _final, _festival)


def _sentences(text: str) -> list[str]:
    parts, start = [], 0
    for i, ch in enumerate(text):
        if ch == "." and (i + 1 == len(text) or text[i + 1] == " "):
            parts.append(text[start:i + 1].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def generate_muse(seed: int = 0, *, n_forget: int = 8, n_retain: int = 8, n_holdout: int = 8, n_icl: int = 3,
                  qa_per_article: int = 2, prompt_sentences: int = 2) -> dict[tuple[str, str], list[dict]]:
    """Every MUSE ``(config, split)`` as rows (see the module docstring). ``qa_per_article`` <= 3."""
    for name, v in (("n_forget", n_forget), ("n_retain", n_retain), ("n_holdout", n_holdout), ("n_icl", n_icl),
                    ("qa_per_article", qa_per_article), ("prompt_sentences", prompt_sentences)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if qa_per_article > 3:
        raise ValueError(f"qa_per_article must be <= 3, got {qa_per_article}")
    rng = random.Random(seed)
    names = _Names(rng)

    def articles(n: int) -> list[tuple[str, list[tuple[str, str]]]]:
        out = []
        for i in range(n):
            text, qa = _KINDS[(i + rng.randrange(len(_KINDS))) % len(_KINDS)](rng, names)
            out.append((text, rng.sample(qa, qa_per_article)))
        return out

    forget, retain, holdout, icl = articles(n_forget), articles(n_retain), articles(n_holdout), articles(n_icl)

    def qa_rows(arts) -> list[dict]:
        return [{"question": q, "answer": a} for _, qa in arts for q, a in qa]

    verbmem = []
    for text, _ in forget:
        sents = _sentences(text)
        k = min(prompt_sentences, len(sents) - 1)
        verbmem.append({"prompt": " ".join(sents[:k]), "gt": " ".join(sents[k:])})
    half = (len(retain) + 1) // 2
    rows = {
        ("raw", "forget"): [{"text": t} for t, _ in forget],
        ("raw", "retain1"): [{"text": t} for t, _ in retain[:half]],
        ("raw", "retain2"): [{"text": t} for t, _ in retain[half:]] or [{"text": retain[0][0]}],
        ("raw", "holdout"): [{"text": t} for t, _ in holdout],
        ("knowmem", "forget_qa"): qa_rows(forget),
        ("knowmem", "retain_qa"): qa_rows(retain[:half]),
        ("knowmem", "forget_qa_icl"): qa_rows(icl)[:n_icl],
        ("knowmem", "retain_qa_icl"): qa_rows(icl)[:n_icl],
        ("verbmem", "forget"): verbmem,
        ("privleak", "forget"): [{"text": t} for t, _ in forget],
        ("privleak", "holdout"): [{"text": t} for t, _ in holdout],
        ("privleak", "retain"): [{"text": t} for t, _ in retain[:half]],
    }
    return rows


def write_muse_folder(path: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Write ``generate_muse(seed, **kwargs)`` as ``<path>/<config>/<split>.jsonl``; returns the folder."""
    path = Path(path)
    for (config, split), rows in generate_muse(seed, **kwargs).items():
        (path / config).mkdir(parents=True, exist_ok=True)
        tmp = path / config / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path / config / f"{split}.jsonl")
    return path


__all__ = ["generate_muse", "write_muse_folder"]
