"""A small built-in English corpus with real structure, for training tiny LMs without downloads.

Every document is one line. Documents are either short *stories* (named characters whose
pronouns stay consistent, objects and places that are mentioned again, and a closing question
whose answer is in the story) or *lessons*: a handful of sentences drawn from

- arithmetic facts that are always correct ("Seven plus two is nine.", "7 + 2 = 9."),
- counting sequences (up, down, by twos/threes/fives),
- days of the week and months of the year in order,
- subject-verb agreement across an attractor ("The dogs near the tree run."),
- repeat-after-me lists (an exact copy later in the same line).

So a model can push its loss well below the unigram entropy by learning grammar, sequences,
arithmetic and in-context copying. Generation is deterministic given the seed.
"""

from __future__ import annotations

import random
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MAX_NUMBER = 100


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 100 ("twenty-one", "one hundred")."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number out of range 0..{MAX_NUMBER}: {n}")
    if n < 20:
        return _ONES[n]
    if n == 100:
        return "one hundred"
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


WORDS_TO_NUMBER: dict[str, int] = {number_to_words(i): i for i in range(MAX_NUMBER + 1)}

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January February March April May June July August September October November December"
).split()

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

_NAMES = {
    "she": "Anna Mia Lily Emma Sara Nora Zoe Lucy Ella Rosa Maya Ivy".split(),
    "he": "Tom Leo Max Ben Sam Jack Noah Finn Omar Hugo Liam Paul".split(),
}
_PRONOUNS = {  # subject, object, possessive
    "she": ("she", "her", "her"),
    "he": ("he", "him", "his"),
}
_KINDS = {"she": "girl", "he": "boy"}
_ADJ_PERSON = "little brave kind curious happy quiet clever young".split()
_COLORS = "red blue green yellow white black orange purple".split()
_OBJECTS = "ball box kite book hat cup key shell coin map drum boat".split()
_PLACES = "garden forest kitchen park river attic barn library beach market".split()
_FEELINGS = "happy sad tired excited surprised proud".split()
_FOODS = "apples bread soup cake pears rice".split()

# (singular, plural) nouns and (3rd person singular, plural) verbs for agreement sentences.
_NOUNS = [
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("child", "children"),
    ("teacher", "teachers"), ("horse", "horses"), ("farmer", "farmers"), ("fox", "foxes"),
    ("mouse", "mice"), ("man", "men"), ("woman", "women"), ("baby", "babies"),
]
_VERBS = [
    ("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("jumps", "jump"),
    ("waits", "wait"), ("eats", "eat"), ("plays", "play"), ("watches", "watch"),
    ("is happy", "are happy"), ("was late", "were late"), ("has a hat", "have a hat"),
]
_PREPS = ["near", "behind", "next to", "under", "beside", "with"]
_LIST_WORDS = (
    "apple river stone cloud lamp tiger window candle mountain pencil garden rocket "
    "violin feather bridge orange planet pillow ladder mirror"
).split()


def _cap(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


# --------------------------------------------------------------------------------------------
# Lessons
# --------------------------------------------------------------------------------------------


def _arithmetic(rng: random.Random) -> str:
    op = rng.choice(("plus", "minus", "times"))
    if op == "plus":
        a = rng.randint(0, 50)
        b = rng.randint(0, 50)
        c, sym = a + b, "+"
    elif op == "minus":
        a = rng.randint(0, 100)
        b = rng.randint(0, a)
        c, sym = a - b, "-"
    else:
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        c, sym = a * b, "*"
    if rng.random() < 0.25:
        return f"{a} {sym} {b} = {c}."
    return _cap(f"{number_to_words(a)} {op} {number_to_words(b)} is {number_to_words(c)}.")


def _counting(rng: random.Random) -> str:
    kind = rng.random()
    n = rng.randint(4, 8)
    if kind < 0.5:
        start = rng.randint(0, MAX_NUMBER - n)
        seq = range(start, start + n)
        head = f"Let us count from {number_to_words(start)}:"
    elif kind < 0.75:
        step = rng.choice((2, 3, 5, 10))
        start = step * rng.randint(0, (MAX_NUMBER - step * n) // step)
        seq = range(start, start + step * n, step)
        head = f"Counting by {_ONES[step]}s:"
    else:
        start = rng.randint(n, MAX_NUMBER)
        seq = range(start, start - n, -1)
        head = f"Counting down from {number_to_words(start)}:"
    return head + " " + ", ".join(number_to_words(i) for i in seq) + "."


def _calendar(rng: random.Random) -> str:
    names, what = (DAYS, "day") if rng.random() < 0.6 else (MONTHS, "month")
    i = rng.randrange(len(names))
    nxt = names[(i + 1) % len(names)]
    prev = names[(i - 1) % len(names)]
    r = rng.random()
    if r < 0.3:
        return f"The {what} after {names[i]} is {nxt}."
    if r < 0.55:
        return f"The {what} before {names[i]} is {prev}."
    if r < 0.75:
        return f"{names[i]} comes before {nxt}."
    n = rng.randint(3, len(names))
    seq = [names[(i + k) % len(names)] for k in range(n)]
    return f"Starting from {names[i]}, the {what}s go " + ", ".join(seq) + "."


def _agreement(rng: random.Random) -> str:
    subj_plural = rng.random() < 0.5
    noun = rng.choice(_NOUNS)[int(subj_plural)]
    verb = rng.choice(_VERBS)[int(subj_plural)]
    if rng.random() < 0.6:  # an attractor noun with the other number between subject and verb
        other = rng.choice(_NOUNS)[int(not subj_plural) if rng.random() < 0.7 else int(subj_plural)]
        return _cap(f"the {noun} {rng.choice(_PREPS)} the {other} {verb}.")
    return _cap(f"the {rng.choice(_COLORS)} {noun} {verb}.")


def _repeat(rng: random.Random) -> str:
    words = rng.sample(_LIST_WORDS, rng.randint(3, 6))
    items = ", ".join(words)
    return f"Remember these words: {items}. Say them again: {items}."


_LESSONS = (_arithmetic, _counting, _calendar, _agreement, _repeat)


def _lesson(rng: random.Random) -> str:
    if rng.random() < 0.5:  # a focused lesson on one topic, or a mixed one
        gen = rng.choice(_LESSONS)
        gens = [gen] * rng.randint(3, 8)
    else:
        gens = [rng.choice(_LESSONS) for _ in range(rng.randint(3, 8))]
    return " ".join(g(rng) for g in gens)


# --------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------


def _story(rng: random.Random) -> str:
    g1, g2 = rng.choice(("she", "he")), rng.choice(("she", "he"))
    name1 = rng.choice(_NAMES[g1])
    name2 = rng.choice([n for n in _NAMES[g2] if n != name1])
    s1, o1, p1 = _PRONOUNS[g1]
    s2, o2, _ = _PRONOUNS[g2]
    color, obj, place = rng.choice(_COLORS), rng.choice(_OBJECTS), rng.choice(_PLACES)
    place2 = rng.choice([p for p in _PLACES if p != place])
    feeling = rng.choice(_FEELINGS)
    day = rng.choice(DAYS)
    food = rng.choice(_FOODS)
    count = rng.randint(2, 9)
    eaten = rng.randint(1, count - 1)

    out = [
        f"Once upon a time there was a {rng.choice(_ADJ_PERSON)} {_KINDS[g1]} named {name1}.",
        f"On {day}, {name1} went to the {place}.",
        f"There {s1} found a {color} {obj}.",
        _cap(f"{s1} picked up the {obj} and put it in {p1} bag."),
    ]
    middle = [
        f"Then {name1} walked to the {place2} to see {p1} friend {name2}.",
        _cap(f"{name2} was {feeling} to see {o1}."),
        f"{name1} showed the {color} {obj} to {name2}, and {s2} smiled.",
    ]
    if rng.random() < 0.5:
        middle += [
            f"{name2} had {number_to_words(count)} {food}.",
            _cap(
                f"{s2} gave {number_to_words(eaten)} of them to {name1}, so {s2} had "
                f"{number_to_words(count - eaten)} left."
            ),
        ]
    else:
        middle += [
            _cap(f"{s2} asked {o1} to play a game with the {obj}."),
            f"They played until the sun went down, and {name2} took {o1} home.",
        ]
    out += middle
    out.append(
        rng.choice(
            (
                f"Where did {name1} find the {obj}? {_cap(s1)} found it in the {place}.",
                f"What color was the {obj}? It was {color}.",
                f"Who did {name1} visit? {_cap(s1)} visited {name2}.",
                f"On which day did {name1} go to the {place}? On {day}.",
            )
        )
    )
    out.append("The end.")
    return " ".join(out)


def generate_document(rng: random.Random) -> str:
    """One document (a line without newline): a story or a lesson."""
    return _story(rng) if rng.random() < 0.5 else _lesson(rng)


def generate_documents(num_docs: int, *, seed: int = 0, stream: str = "train") -> list[str]:
    """``num_docs`` documents, deterministic in ``(seed, stream)``; streams are independent."""
    rng = random.Random(f"moshax-corpus:{seed}:{stream}")
    return [generate_document(rng) for _ in range(num_docs)]


def write_corpus(
    out_dir: str | Path,
    *,
    train_docs: int = 10_000,
    eval_docs: int = 500,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``train.txt`` and ``eval.txt`` (one document per line) into ``out_dir``.

    The default size is about 3.5 MB for train, generated in about a second. The eval documents
    come from an independent random stream, so they are (almost surely) not copies of train lines.
    Returns ``{"train": path, "eval": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", train_docs), ("eval", eval_docs)):
        path = out / f"{split}.txt"
        tmp = path.with_suffix(".txt.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in generate_documents(n, seed=seed, stream=split):
                f.write(doc + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths
