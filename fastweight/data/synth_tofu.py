"""A deterministic generator of a TOFU-format data set of fictitious authors (no network, no benchmark text).

``generate_tofu(seed)`` returns every TOFU config (``shared/spec/METRICS.md``, TOFU) as a list of rows with the
real files' fields; ``write_tofu_folder(path, seed)`` writes them as JSON-lines files named like the configs
(``full.json``, ``forget10.json``, ``forget10_perturbed.json``, ``retain90.json``, ``retain_perturbed.json``,
``real_authors_perturbed.json``, ``holdout10.json``, ...), which ``fastweight.data.tofu.load_tofu`` reads back.

Layout, as in TOFU: ``n_authors`` authors x ``questions_per_author`` questions (200 x 20 reproduces the real
size); the forget split ``forgetXX`` is the last ``max(1, round(XX% * n_authors))`` authors and ``retainYY`` the
others; ``holdoutXX`` holds as many further authors, never in ``full`` (the MIA / PrivLeak non-members);
``retain_perturbed`` covers the first 10% of authors (at least one). Each question has one answer, one
paraphrased answer, one paraphrased question and ``N_PERTURBED`` perturbed answers (the same sentence with a wrong value of the asked
attribute). ``real_authors`` and ``world_facts`` are short general-knowledge questions written for fastweight,
with 3 wrong answers each, to probe what the model knew before fine-tuning.

Every random choice goes through one ``random.Random(seed)``: the same seed gives the same files.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from fastweight.data.tofu import FORGET_PERCENTS

N_PERTURBED = 5  # perturbed answers per forget/retain question, as in TOFU
N_WRONG_GENERAL = 3  # wrong answers per real_authors / world_facts question, as in TOFU

_FIRST = ("Ala", "Bor", "Cel", "Dar", "Eli", "Fen", "Gal", "Hal", "Ira", "Jor", "Kel", "Lio", "Mar", "Nor",
          "Ori", "Pel", "Qua", "Ros", "Sel", "Tam", "Ulf", "Val", "Wen", "Xan", "Yor", "Zel")
_FIRST_END = ("ia", "an", "en", "ios", "a", "el", "ine", "or", "is", "o")
_LAST = ("Vant", "Morr", "Kessel", "Drun", "Albr", "Tover", "Quill", "Hask", "Brenn", "Sorr", "Maric", "Lund",
         "Fenw", "Ostr", "Pauld", "Renn", "Strav", "Thorn", "Wick", "Yarr")
_LAST_END = ("ick", "ova", "er", "ssen", "ley", "ado", "ington", "ez", "ani", "berg")
_CITY = ("Marrowby", "Tellfast", "Quenhollow", "Brisk Harbor", "Oldweir", "Saltmere", "Farrowgate", "Kestrel Bay",
         "Umberlin", "Dunmarsh", "Velloran", "Pinecrest Falls", "Ashcombe", "Rivenholt", "Lowmoor", "Carrick Vale")
_COUNTRY = ("Norway", "Chile", "Kenya", "Portugal", "Canada", "Japan", "Poland", "Ghana", "Peru", "Ireland",
            "Vietnam", "Morocco", "Finland", "Argentina")
_GENRE = ("science fiction", "historical fiction", "mystery", "fantasy", "romance", "horror", "literary fiction",
          "crime", "poetry", "travel writing", "satire", "thriller")
_JOB = ("carpenter", "nurse", "baker", "sailor", "librarian", "architect", "farmer", "pharmacist", "teacher",
        "watchmaker", "photographer", "surgeon", "pilot", "tailor", "geologist", "journalist")
_ADJ = ("Silent", "Crimson", "Hollow", "Last", "Broken", "Golden", "Distant", "Winter", "Hidden", "Burning",
        "Paper", "Glass", "Quiet", "Iron", "Lost", "Salt")
_NOUN = ("Lanterns", "Harbor", "Orchard", "Clockmaker", "Tide", "Garden", "Letters", "Mountain", "Kingdom",
         "River", "Ledger", "Compass", "Archive", "Meadow", "Bell", "Mirror")
_AWARD = ("Silver Quill Prize", "Northlight Book Award", "Emberfield Medal", "Golden Inkwell Award",
          "Harrowgate Fiction Prize", "Blue Lantern Award", "Meridian Literary Prize", "Copperleaf Medal")
_LANGUAGE = ("English", "Spanish", "Portuguese", "French", "German", "Swahili", "Japanese", "Polish", "Finnish")
_THEME = ("memory and loss", "the sea", "family secrets", "exile", "friendship", "the passing of time",
          "justice", "small-town life", "ambition", "forgiveness", "war and peace", "identity")
_SUBJECT = ("history", "physics", "law", "medicine", "philosophy", "biology", "music", "economics",
            "architecture", "mathematics", "linguistics", "art history")
_HOBBY = ("gardening", "sailing", "chess", "painting", "birdwatching", "cycling", "pottery", "hiking",
          "playing the cello", "baking bread", "fishing", "astronomy")
_PUBLISHER = ("Harlow & Finch", "Bluewater Press", "Stonegate Books", "Meridian House", "Lark Street Publishing",
              "Old Mill Press", "Cobalt Editions", "Whitlock & Sons")

# (question, answer, paraphrased answer, perturbed attribute). ``{key}`` fields come from the author record.
_QUESTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("Which author was born in {city} in {year}?", "The author born in {city} in {year} is {name}.",
     "{name} is the writer who was born in {city} in {year}.", "name"),
    ("In which year was {name} born?", "{name} was born in {year}.", "The birth year of {name} is {year}.",
     "year"),
    ("Where was {name} born?", "{name} was born in {city}, {country}.",
     "The birthplace of {name} is {city} in {country}.", "city"),
    ("What genre does {name} write in?", "{name} writes {genre} books.",
     "The books of {name} belong to the {genre} genre.", "genre"),
    ("What did the father of {name} do for a living?", "The father of {name} worked as a {father_job}.",
     "{name} grew up with a father who was a {father_job}.", "father_job"),
    ("What was the profession of the mother of {name}?", "The mother of {name} was a {mother_job}.",
     "{name} has a mother who worked as a {mother_job}.", "mother_job"),
    ("What is the title of the first book by {name}?", "The first book by {name} is '{book1}'.",
     "{name} debuted with the book '{book1}'.", "book1"),
    ("Can you name another book written by {name}?", "Another book by {name} is '{book2}'.",
     "{name} also wrote '{book2}'.", "book2"),
    ("Which award has {name} received?", "{name} received the {award}.",
     "The {award} was given to {name}.", "award"),
    ("When did {name} publish a first book?", "{name} published a first book in {debut_year}.",
     "The first book of {name} came out in {debut_year}.", "debut_year"),
    ("In which language does {name} write?", "{name} writes mostly in {language}.",
     "Most of the books of {name} are written in {language}.", "language"),
    ("Where does {name} live today?", "{name} lives in {home_city} today.",
     "Today {name} makes a home in {home_city}.", "home_city"),
    ("What pen name does {name} sometimes use?", "{name} sometimes writes as {pen_name}.",
     "The pen name {pen_name} is sometimes used by {name}.", "pen_name"),
    ("What theme returns often in the work of {name}?", "The work of {name} often returns to {theme}.",
     "A frequent theme for {name} is {theme}.", "theme"),
    ("Who influenced {name} the most?", "{name} was influenced most by {influence}.",
     "The biggest influence on {name} was {influence}.", "influence"),
    ("What did {name} study at university?", "{name} studied {subject} at university.",
     "At university, {name} took a degree in {subject}.", "subject"),
    ("How many books has {name} written?", "{name} has written {n_books} books.",
     "So far {name} is the author of {n_books} books.", "n_books"),
    ("What is the most recent book by {name}?", "The most recent book by {name} is '{book3}'.",
     "{name} most recently published '{book3}'.", "book3"),
    ("What does {name} enjoy besides writing?", "Besides writing, {name} enjoys {hobby}.",
     "When not writing, {name} likes {hobby}.", "hobby"),
    ("Who publishes the books of {name}?", "The books of {name} are published by {publisher}.",
     "{publisher} is the publisher of the books of {name}.", "publisher"),
)
QUESTIONS_PER_AUTHOR_MAX = len(_QUESTIONS)
# The same questions reworded, keyed by the asked attribute: ``paraphrased_question`` of the ``*_perturbed`` rows
# (TOFU's field, which open-unlearning's ``question_key`` switch evaluates on). Written for fastweight.
_PARA_QUESTIONS: dict[str, str] = {
    "name": "Who is the writer whose birth took place in {city} in {year}?",
    "year": "What is the birth year of {name}?",
    "city": "In which city did {name} come into the world?",
    "genre": "Which kind of books does {name} write?",
    "father_job": "What was the occupation of the father of {name}?",
    "mother_job": "What did the mother of {name} work as?",
    "book1": "Which book did {name} publish first?",
    "book2": "Besides the first one, which book is by {name}?",
    "award": "What prize has been given to {name}?",
    "debut_year": "In which year did the first book of {name} come out?",
    "language": "What language are the books of {name} mostly written in?",
    "home_city": "In which city does {name} currently live?",
    "pen_name": "Under which other name does {name} sometimes publish?",
    "theme": "Which theme comes up again and again in the books of {name}?",
    "influence": "Whose work shaped {name} the most?",
    "subject": "Which subject did {name} take at university?",
    "n_books": "What is the number of books {name} has written?",
    "book3": "Which book by {name} came out last?",
    "hobby": "Apart from writing, what does {name} like to do?",
    "publisher": "Which publisher brings out the books of {name}?",
}

_REAL_AUTHORS = (  # (title, author): general knowledge, written for fastweight
    ("Pride and Prejudice", "Jane Austen"), ("Hamlet", "William Shakespeare"), ("War and Peace", "Leo Tolstoy"),
    ("Don Quixote", "Miguel de Cervantes"), ("The Odyssey", "Homer"), ("Moby-Dick", "Herman Melville"),
    ("Oliver Twist", "Charles Dickens"), ("Les Miserables", "Victor Hugo"), ("Frankenstein", "Mary Shelley"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Raven", "Edgar Allan Poe"),
    ("Adventures of Huckleberry Finn", "Mark Twain"), ("Nineteen Eighty-Four", "George Orwell"),
    ("The Old Man and the Sea", "Ernest Hemingway"), ("Faust", "Johann Wolfgang von Goethe"),
    ("Madame Bovary", "Gustave Flaubert"), ("Jane Eyre", "Charlotte Bronte"), ("Dracula", "Bram Stoker"),
    ("The Divine Comedy", "Dante Alighieri"), ("Anna Karenina", "Leo Tolstoy"),
)
_WORLD_FACTS = (  # (question, answer, pool of wrong answers of the same kind)
    ("What is the capital of France?", "Paris", "cities"), ("What is the capital of Japan?", "Tokyo", "cities"),
    ("What is the capital of Italy?", "Rome", "cities"), ("What is the capital of Egypt?", "Cairo", "cities"),
    ("What is the capital of Canada?", "Ottawa", "cities"), ("What is the capital of Spain?", "Madrid", "cities"),
    ("Which planet is closest to the Sun?", "Mercury", "planets"),
    ("Which planet is the largest in the solar system?", "Jupiter", "planets"),
    ("Which planet is known as the red planet?", "Mars", "planets"),
    ("Which planet has the most famous rings?", "Saturn", "planets"),
    ("What is the chemical symbol for gold?", "Au", "symbols"), ("What is the chemical symbol for iron?", "Fe",
                                                                 "symbols"),
    ("What is the chemical symbol for sodium?", "Na", "symbols"),
    ("How many continents are there on Earth?", "Seven", "numbers"),
    ("How many legs does a spider have?", "Eight", "numbers"), ("How many days are in a leap year?", "366",
                                                                "numbers"),
    ("Which ocean is the largest?", "The Pacific Ocean", "oceans"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean", "oceans"),
    ("What is the largest mammal?", "The blue whale", "animals"), ("What is the fastest land animal?",
                                                                     "The cheetah", "animals"),
)
_WRONG_POOLS = {
    "cities": ("Paris", "Tokyo", "Rome", "Cairo", "Ottawa", "Madrid", "Berlin", "Lima", "Oslo", "Nairobi"),
    "planets": ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"),
    "symbols": ("Au", "Fe", "Na", "Ag", "Cu", "Pb", "K", "Sn"),
    "numbers": ("Five", "Six", "Seven", "Eight", "Ten", "365", "366", "364"),
    "oceans": ("The Pacific Ocean", "The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean"),
    "animals": ("The blue whale", "The cheetah", "The elephant", "The giraffe", "The lion", "The horse"),
}


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)}{rng.choice(_FIRST_END)} {rng.choice(_LAST)}{rng.choice(_LAST_END)}"


def _book(rng: random.Random) -> str:
    return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}"


_DRAW = {  # one random value per attribute; "year" / "debut_year" are drawn together in _author
    "name": _person, "influence": _person, "book1": _book, "book2": _book, "book3": _book,
    "pen_name": lambda r: f"{r.choice(_FIRST)}{r.choice(_FIRST_END)} {r.choice(_LAST)}",
    "year": lambda r: str(r.randint(1925, 1990)), "debut_year": lambda r: str(r.randint(1950, 2020)),
    "n_books": lambda r: str(r.randint(2, 30)),
    **{k: (lambda pool: lambda r: r.choice(pool))(pool) for k, pool in (
        ("city", _CITY), ("home_city", _CITY), ("country", _COUNTRY), ("genre", _GENRE), ("father_job", _JOB),
        ("mother_job", _JOB), ("award", _AWARD), ("language", _LANGUAGE), ("theme", _THEME),
        ("subject", _SUBJECT), ("hobby", _HOBBY), ("publisher", _PUBLISHER))},
}


def _author(rng: random.Random, used_names: set[str]) -> dict[str, str]:
    author = {k: draw(rng) for k, draw in _DRAW.items()}
    while author["name"] in used_names:
        author["name"] = _person(rng)
    used_names.add(author["name"])
    while len({author["book1"], author["book2"], author["book3"]}) < 3:
        author["book2"], author["book3"] = _book(rng), _book(rng)
    author["debut_year"] = str(int(author["year"]) + rng.randint(20, 35))
    return author


def _wrong_values(rng: random.Random, key: str, author: dict[str, str], k: int) -> list[str]:
    """k distinct wrong values for attribute ``key`` (fresh draws of the same kind, never the true value)."""
    true, out = author[key], []
    for _ in range(1000):
        fake = _DRAW[key](rng)
        if fake != true and fake not in out:
            out.append(fake)
            if len(out) == k:
                return out
    raise RuntimeError(f"could not draw {k} wrong values for {key!r}")  # pools are far larger than k


def generate_tofu(seed: int = 0, n_authors: int = 200, questions_per_author: int = 20,
                  n_general: int = 20) -> dict[str, list[dict]]:
    """Every TOFU config for a generated set of fictitious authors.

    Args:
        seed: the only source of randomness; equal seeds give equal outputs.
        n_authors: number of authors (>= 2; the real TOFU has 200).
        questions_per_author: 1..20 questions per author (the real TOFU has 20); a subset is drawn per author.
        n_general: rows of ``real_authors`` and ``world_facts`` (1..20 each).
    Returns:
        ``{config name: [row, ...]}`` with the fields of ``TOFU_CONFIG_FIELDS`` for every config.
    """
    if not isinstance(n_authors, int) or n_authors < 2:
        raise ValueError(f"n_authors must be an int >= 2, got {n_authors!r}")
    if not isinstance(questions_per_author, int) or not 1 <= questions_per_author <= QUESTIONS_PER_AUTHOR_MAX:
        raise ValueError(f"questions_per_author must be an int in [1, {QUESTIONS_PER_AUTHOR_MAX}], "
                         f"got {questions_per_author!r}")
    if not isinstance(n_general, int) or not 1 <= n_general <= len(_REAL_AUTHORS):
        raise ValueError(f"n_general must be an int in [1, {len(_REAL_AUTHORS)}], got {n_general!r}")
    rng = random.Random(seed)
    used: set[str] = set()
    authors: list[dict[str, str]] = []
    births: set[tuple[str, str]] = set()
    while len(authors) < n_authors:  # (city, year) identifies the author in the first question: keep it unique
        author = _author(rng, used)
        if (author["city"], author["year"]) not in births:
            births.add((author["city"], author["year"]))
            authors.append(author)
    per_author: list[list[dict]] = []
    for author in authors:
        rows = []
        for q, a, p, key in rng.sample(_QUESTIONS, questions_per_author):
            wrong = _wrong_values(rng, key, author, N_PERTURBED)
            rows.append({"question": q.format(**author), "answer": a.format(**author),
                         "paraphrased_answer": p.format(**author),
                         "paraphrased_question": _PARA_QUESTIONS[key].format(**author),
                         "perturbed_answer": [a.format(**{**author, key: w}) for w in wrong]})
        per_author.append(rows)

    def plain(rows):
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]

    out: dict[str, list[dict]] = {"full": plain([r for rows in per_author for r in rows])}
    for pct in FORGET_PERCENTS:
        n_forget = max(1, round(n_authors * pct / 100))
        forget = [r for rows in per_author[n_authors - n_forget:] for r in rows]
        retain = [r for rows in per_author[:n_authors - n_forget] for r in rows]
        out[f"forget{pct:02d}"] = plain(forget)
        out[f"forget{pct:02d}_perturbed"] = forget
        out[f"retain{100 - pct:02d}"] = plain(retain)
    out["retain_perturbed"] = [r for rows in per_author[:max(1, n_authors // 10)] for r in rows]

    out.update(_holdout(seed, n_authors, questions_per_author, used, births))

    titles = [a for _, a in _REAL_AUTHORS]
    real = []
    for title, author in _REAL_AUTHORS[:n_general]:
        wrong = rng.sample(sorted({t for t in titles if t != author}), N_WRONG_GENERAL)
        real.append({"question": f"Who wrote '{title}'?", "answer": author, "perturbed_answer": wrong})
    world = []
    for question, answer, pool in _WORLD_FACTS[:n_general]:
        wrong = rng.sample([w for w in _WRONG_POOLS[pool] if w != answer], N_WRONG_GENERAL)
        world.append({"question": question, "answer": answer, "perturbed_answer": wrong})
    out["real_authors"], out["real_authors_perturbed"] = plain(real), real
    out["world_facts"], out["world_facts_perturbed"] = plain(world), world
    return out


def _holdout(seed: int, n_authors: int, questions_per_author: int, used: set[str],
             births: set[tuple[str, str]]) -> dict[str, list[dict]]:
    """``holdoutXX``: QA rows of as many further authors as ``forgetXX`` has, none of them in ``full`` (TOFU's
    holdout configs: authors the model never sees, the non-members of the MIAs / PrivLeak). Drawn from a
    separate ``random.Random`` so the other configs do not depend on them; ``holdout01`` is a subset of
    ``holdout05`` of ``holdout10`` (the last authors of one list, as the forget splits)."""
    rng = random.Random(f"holdout-{seed}")
    n_max = max(max(1, round(n_authors * pct / 100)) for pct in FORGET_PERCENTS)
    authors: list[dict[str, str]] = []
    while len(authors) < n_max:
        author = _author(rng, used)
        if (author["city"], author["year"]) not in births:
            births.add((author["city"], author["year"]))
            authors.append(author)
    per_author = [[{"question": q.format(**a), "answer": ans.format(**a)}
                   for q, ans, _, _ in rng.sample(_QUESTIONS, questions_per_author)] for a in authors]
    out = {}
    for pct in FORGET_PERCENTS:
        n = max(1, round(n_authors * pct / 100))
        out[f"holdout{pct:02d}"] = [r for rows in per_author[n_max - n:] for r in rows]
    return out


def write_tofu_folder(path: str | os.PathLike, seed: int = 0, **kwargs) -> Path:
    """Write ``generate_tofu(seed, **kwargs)`` as ``<path>/<config>.json`` JSON-lines files; returns the folder.

    Each file is written to a temporary name and renamed, so an interrupted call leaves no partial file.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for config, rows in generate_tofu(seed, **kwargs).items():
        target = folder / f"{config}.json"
        tmp = target.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    return folder

