"""Small tasks whose answers can be checked exactly: the demo's measuring stick.

SFT accuracy, the simulated annotator, the reward for PPO and win rates all call `check`, so
it is strict, deterministic and independent of any model. A task is a prompt plus one short
canonical answer; `data` holds the structured inputs so an answer can be recomputed.

Kinds: add, sub, mul, reverse, sort, count, lookup, compare, first, last, length.

Answer rule (`check`): only the first non-empty line of the response is judged, because a
small model often runs on into the next "Question:". The line is lower-cased, stripped of
trailing ". ! quotes", quotes and Markdown emphasis ("**68**", "_tac_") are stripped from each
word, and ":" "=" become separate words; for `sort`, commas, semicolons, brackets and
parentheses count as spaces. The response is
correct when the line's words equal the answer's words ("68", "68.", "'tac'"), or when the
line ends with the answer's words right after a lead-in: a real word of two or more letters,
"a", "an", ":", "=", or a word ending in "?" ("The answer is 68.", "50 + 18 = 68", "A piano.").
Words that hedge ("or", "than", ...) are no lead-in, and a denial anywhere before the answer
("not", "never", "isn't", "doesn't", with either apostrophe or none) makes it wrong. So "6 8",
"168", "068", "-68", "1 68", "12 or 68", "not 68", "it doesn't equal 68" and "a b c d" (for "d")
are all wrong.

Held-out sets: tasks are drawn from a seeded stream; `make_pools` draws held-out pools first
(each prompt unique, pools disjoint) and then training pools that exclude every held-out
prompt. Disjointness is by prompt text, so a lookup fact can be held out in one phrasing and
trained on in another: that measures recall of the fact, not of the sentence.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

KINDS = ("add", "sub", "mul", "reverse", "sort", "count", "lookup", "compare",
         "first", "last", "length")

# Common English words, 3-8 lowercase letters: the vocabulary of every word task.
WORDS = tuple("""
acid actor adult agent alarm album alive alley amber angel angle animal
answer apple april arena army arrow artist autumn baby bacon badge baker ball banana band
bank barn basket beach beard bean bear beauty bedroom bell belt bench berry bicycle bird
biscuit black blade blanket block blossom board boat bone book border bottle bottom bowl
brain branch brave bread breeze brick bridge bright broom brother brush bubble bucket
budget button cabin cable cactus cake camel camera camp candle canoe canvas carbon card
carpet carrot castle cattle ceiling cellar center chain chair chalk channel cheese cherry
chicken child circle city clock cloud coast coffee coin color comet copper corner cotton
country cousin cradle crayon credit cricket crown crystal cushion dancer danger daughter
desert desk diamond dinner doctor dollar dolphin donkey door dragon drawer dream dress
drum eagle earth echo editor egg elbow engine evening fabric factory falcon family farmer
feather fence field finger fire flag flame flower forest fork fossil fountain fox friday
friend frog fruit garage garden garlic gate ghost giant ginger glass globe glove goat gold
grape grass gravel guitar hammer harbor hat hazel helmet hero hill honey horse hotel house
hunter island jacket jelly jewel jungle kettle key kitchen kite knife ladder lake lamp
lantern lawyer leaf lemon letter library light lion lizard lobster machine magnet mango
marble market meadow melody metal mirror monkey moon morning mother motor mountain mouse
music needle nest night noodle number ocean office olive onion orange orchard oven owl
paddle palace panda paper parrot pasta pencil pepper piano picnic pillow pilot planet
plate pocket poem potato prince puzzle pyramid queen rabbit radio rain rainbow river road
robot rocket roof rose ruler saddle sailor salad salt sand school scissors season shadow
shelf shell ship shoe shovel silver singer sister sky snake snow soap soccer sock spider
spoon spring square squirrel stairs star station stone storm story street sugar summer
sun sunset swan sweater table tiger timber toast tomato tooth tower town tractor train
tree truck tunnel turtle umbrella valley velvet village violin voice wagon wallet walnut
water whale wheel window winter wizard wolf wood yellow zebra
""".split())

# The lookup facts. Opposites are asked both ways, so each pair is two questions.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Russia": "Moscow",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Australia": "Canberra", "Chile": "Santiago", "Turkey": "Ankara", "Thailand": "Bangkok",
    "Cuba": "Havana", "Denmark": "Copenhagen",
}
COLOURS = {
    "banana": "yellow", "lemon": "yellow", "lime": "green", "strawberry": "red",
    "cherry": "red", "tomato": "red", "raspberry": "red", "blueberry": "blue",
    "carrot": "orange", "pumpkin": "orange", "plum": "purple", "eggplant": "purple",
    "cucumber": "green", "avocado": "green", "coconut": "brown", "frog": "green",
    "snowflake": "white", "swan": "white", "crow": "black", "flamingo": "pink",
}
_OPPOSITE_PAIRS = (
    ("hot", "cold"), ("up", "down"), ("left", "right"), ("fast", "slow"), ("happy", "sad"),
    ("early", "late"), ("full", "empty"), ("strong", "weak"), ("high", "low"), ("wet", "dry"),
    ("loud", "quiet"), ("rich", "poor"), ("thick", "thin"), ("win", "lose"), ("push", "pull"),
    ("day", "night"), ("black", "white"), ("north", "south"), ("east", "west"),
    ("inside", "outside"), ("above", "below"), ("true", "false"), ("buy", "sell"),
    ("love", "hate"), ("before", "after"),
)
OPPOSITES = {**dict(_OPPOSITE_PAIRS), **{b: a for a, b in _OPPOSITE_PAIRS}}
LOOKUP = {"capital": CAPITALS, "colour": COLOURS, "opposite": OPPOSITES}

# Several phrasings per kind, so the model has to read the prompt rather than its shape.
# Keys are "kind" or "kind:variant" (see _template_key).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.",
            "Compute the sum of {a} and {b}.", "{a} + {b} = ?"),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.",
            "Compute the difference {a} - {b}.", "{a} - {b} = ?"),
    "mul": ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
            "Compute the product of {a} and {b}.", "{a} x {b} = ?"),
    "reverse": ("Reverse the word '{word}'.", "Spell '{word}' backwards.",
                "Write the letters of {word} in reverse order.", "What is '{word}' reversed?"),
    "sort": ("Sort these numbers in ascending order: {nums}.",
             "Sort from smallest to largest: {nums}",
             "Put these numbers in increasing order: {nums}.",
             "Arrange {nums} from lowest to highest."),
    "count:letter": ("How many times does the letter '{letter}' appear in '{word}'?",
                     "Count the letter {letter} in the word {word}.",
                     "In the word '{word}', how many times does '{letter}' occur?"),
    "count:words": ("How many words are in this sentence: '{sentence}'?",
                    "Count the words in '{sentence}'.",
                    "How many words does '{sentence}' have?"),
    "lookup:capital": ("What is the capital of {key}?", "Name the capital city of {key}.",
                       "Which city is the capital of {key}?",
                       "The capital of {key} is which city?"),
    "lookup:colour": ("What colour is {a_key}?", "What is the colour of {a_key}?",
                      "Name the colour of {a_key}.", "{A_key} is usually what colour?"),
    "lookup:opposite": ("What is the opposite of '{key}'?",
                        "Give the opposite of the word {key}.",
                        "What word means the opposite of '{key}'?",
                        "Name the antonym of '{key}'."),
    "compare:larger": ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?",
                       "What is the larger of {a} and {b}?"),
    "compare:smaller": ("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?",
                        "What is the smaller of {a} and {b}?"),
    "first": ("What is the first letter of '{word}'?", "Which letter does '{word}' start with?",
              "Give the first letter of the word {word}."),
    "last": ("What is the last letter of '{word}'?", "Which letter does '{word}' end with?",
             "Give the final letter of the word {word}."),
    "length": ("How many letters are in '{word}'?", "How long is the word '{word}'?",
               "Count the letters in {word}.", "What is the length of the word '{word}'?"),
}


@dataclass(frozen=True)
class Task:
    kind: str
    prompt: str
    answer: str
    # Excluded from the hash (a dict cannot be hashed); equality still compares it.
    data: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "prompt": self.prompt, "answer": self.answer,
                "data": self.data}

    @classmethod
    def from_dict(cls, d: Any) -> "Task":
        if not isinstance(d, dict):
            raise ValueError(f"a task must be a JSON object, got {type(d).__name__}")
        for name in ("kind", "prompt", "answer"):
            if not isinstance(d.get(name), str) or not d[name]:
                raise ValueError(f"task field '{name}' must be a non-empty string")
        data = d.get("data", {})
        if not isinstance(data, dict):
            raise ValueError("task field 'data' must be an object")
        return cls(d["kind"], d["prompt"], d["answer"], dict(data))


def answer_for(kind: str, data: dict) -> str:
    """The canonical answer, computed from the structured inputs."""
    if kind == "add":
        return str(data["a"] + data["b"])
    if kind == "sub":
        return str(data["a"] - data["b"])
    if kind == "mul":
        return str(data["a"] * data["b"])
    if kind == "reverse":
        return data["word"][::-1]
    if kind == "sort":
        return ", ".join(str(x) for x in sorted(data["numbers"]))
    if kind == "count":
        if data["mode"] == "letter":
            return str(data["word"].count(data["letter"]))
        return str(len(data["sentence"].split()))
    if kind == "lookup":
        return LOOKUP[data["table"]][data["key"]]
    if kind == "compare":
        pick = max if data["op"] == "larger" else min
        return str(pick(data["a"], data["b"]))
    if kind == "first":
        return data["word"][0]
    if kind == "last":
        return data["word"][-1]
    if kind == "length":
        return str(len(data["word"]))
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")


def _template_key(kind: str, data: dict) -> str:
    variant = {"count": "mode", "lookup": "table", "compare": "op"}.get(kind)
    return f"{kind}:{data[variant]}" if variant else kind


def _build(kind: str, data: dict, template: int) -> Task:
    fields = dict(data)
    if kind == "sort":
        fields["nums"] = ", ".join(str(x) for x in data["numbers"])
    if kind == "lookup":
        key = data["key"]
        fields["a_key"] = ("an " if key[0] in "aeiou" else "a ") + key
        fields["A_key"] = fields["a_key"].capitalize()
    text = TEMPLATES[_template_key(kind, data)][template].format(**fields)
    return Task(kind, text, answer_for(kind, data), data)


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    # Pick the digit count first so short numbers are as common as long ones.
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(1 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _random_data(kind: str, rng: random.Random) -> dict:
    if kind in ("add", "sub"):
        a, b = _number(rng, 2, 3), _number(rng, 2, 3)
        if kind == "sub" and a < b:
            a, b = b, a  # answers stay non-negative: "-" is one more thing to get wrong
        return {"a": a, "b": b}
    if kind == "mul":
        return {"a": _number(rng, 1, 2), "b": _number(rng, 1, 2)}
    if kind in ("reverse", "first", "last", "length"):
        return {"word": rng.choice(WORDS)}
    if kind == "sort":
        return {"numbers": rng.sample(range(100), rng.randint(3, 6))}
    if kind == "count":
        if rng.random() < 0.5:
            word = rng.choice(WORDS)
            # Mostly a letter that occurs; sometimes any letter, so "0" is a possible answer.
            alphabet = word if rng.random() < 0.75 else "abcdefghijklmnopqrstuvwxyz"
            letter = rng.choice(alphabet)
            return {"mode": "letter", "letter": letter, "word": word}
        return {"mode": "words", "sentence": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))}
    if kind == "lookup":
        table = rng.choice(sorted(LOOKUP))
        return {"table": table, "key": rng.choice(sorted(LOOKUP[table]))}
    if kind == "compare":
        a = _number(rng, 1, 3)
        b = a
        while b == a:
            b = _number(rng, 1, 3)
        return {"a": a, "b": b, "op": rng.choice(("larger", "smaller"))}
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KINDS)}")


def _random_task(kind: str, rng: random.Random) -> Task:
    data = _random_data(kind, rng)
    return _build(kind, data, rng.randrange(len(TEMPLATES[_template_key(kind, data)])))


def _all_tasks(kind: str) -> list[Task] | None:
    """Every task of a kind with a small prompt space (None for the practically infinite ones).

    Lets a draw that must avoid many prompts finish exactly instead of retrying forever."""
    if kind in ("reverse", "first", "last", "length"):
        datas = [{"word": w} for w in WORDS]
    elif kind == "lookup":
        datas = [{"table": t, "key": k} for t in sorted(LOOKUP) for k in sorted(LOOKUP[t])]
    else:
        return None
    return [_build(kind, d, i)
            for d in datas for i in range(len(TEMPLATES[_template_key(kind, d)]))]


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    kinds = tuple(KINDS if kinds is None else kinds)
    if not kinds:
        raise ValueError("kinds must not be empty")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown task kind {bad[0]!r}; known: {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError("kinds must not repeat")
    return kinds


def iter_tasks(seed: int, kinds: Sequence[str] | None = None, *, stream: str = "tasks",
               exclude: Iterable[str] = (), unique: bool = False) -> Iterator[Task]:
    """An endless, seeded stream of tasks.

    Kinds come in rounds (each round every kind once, in a shuffled order), so any prefix is
    balanced to within one task per kind. `stream` names an independent sequence for the same
    seed. Prompts in `exclude` never appear; with `unique` no prompt appears twice. Raises
    ValueError when a kind has no unused prompt left."""
    kinds = _check_kinds(kinds)
    rng = random.Random(f"workbench-tasks/{seed}/{stream}")
    banned = set(exclude)
    while True:
        order = list(kinds)
        rng.shuffle(order)
        for kind in order:
            task = None
            for _ in range(200):
                t = _random_task(kind, rng)
                if t.prompt not in banned:
                    task = t
                    break
            if task is None:
                left = [t for t in (_all_tasks(kind) or []) if t.prompt not in banned]
                if not left:
                    raise ValueError(f"no unused prompt left for task kind {kind!r}: "
                                     f"ask for fewer tasks or hold out fewer")
                task = rng.choice(left)
            if unique:
                banned.add(task.prompt)
            yield task


def generate_tasks(n: int, seed: int, kinds: Sequence[str] | None = None, *,
                   stream: str = "tasks", exclude: Iterable[str] = (),
                   unique: bool = False) -> list[Task]:
    """`n` tasks, deterministic for (seed, stream), kinds balanced to within one."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    it = iter_tasks(seed, kinds, stream=stream, exclude=exclude, unique=unique)
    return [next(it) for _ in range(n)]


def make_pools(seed: int, held_out: dict[str, int], train: dict[str, int],
               kinds: Sequence[str] | None = None) -> dict[str, list[Task]]:
    """Named pools of tasks: held-out pools first, then training pools.

    Each held-out pool has unique prompts and shares none with any other pool; they are drawn
    in the order given, so adding a pool at the end leaves the earlier ones unchanged.
    Training pools may repeat prompts and overlap each other, never the held-out ones."""
    out: dict[str, list[Task]] = {}
    used: set[str] = set()
    for name, n in held_out.items():
        out[name] = generate_tasks(n, seed, kinds, stream=name, exclude=used, unique=True)
        used.update(t.prompt for t in out[name])
    for name, n in train.items():
        if name in out:
            raise ValueError(f"pool name {name!r} used twice")
        out[name] = generate_tasks(n, seed, kinds, stream=name, exclude=used)
    return out


def make_splits(n_train: int, n_eval: int, seed: int,
                kinds: Sequence[str] | None = None) -> tuple[list[Task], list[Task]]:
    """(train, eval): no eval prompt appears in train; eval prompts are unique."""
    pools = make_pools(seed, {"eval": n_eval}, {"train": n_train}, kinds)
    return pools["train"], pools["eval"]


# --- parsing a prompt back into its task ----------------------------------------------------

# What each template field may hold. Lookup keys are limited to the known facts; words need
# not be in WORDS (a user's "Reverse the word 'xyzzy'." is still a reverse task).
_FIELD_RES = {"a": r"\d+", "b": r"\d+", "word": r"[a-z]+", "letter": r"[a-z]",
              "nums": r"\d+(?:, \d+)*", "sentence": r"[a-z]+(?: [a-z]+)*"}
_PARSERS: list[tuple[re.Pattern, str, str, int]] = []


def _parsers() -> list[tuple[re.Pattern, str, str, int]]:
    """(regex, kind, variant, template index) for every template, built once."""
    if not _PARSERS:
        for key, templates in TEMPLATES.items():
            kind, _, variant = key.partition(":")
            fields = dict(_FIELD_RES)
            if kind == "lookup":
                keys = "|".join(re.escape(k) for k in sorted(LOOKUP[variant], key=len, reverse=True))
                fields.update(key=f"(?P<key>{keys})", a_key=f"(?:an?) (?P<key>{keys})",
                              A_key=f"(?:An?) (?P<key>{keys})")
            for index, template in enumerate(templates):
                parts = re.split(r"\{(\w+)\}", template)
                regex = "".join(
                    re.escape(p) if i % 2 == 0
                    else fields[p] if p in ("key", "a_key", "A_key") else f"(?P<{p}>{fields[p]})"
                    for i, p in enumerate(parts))
                _PARSERS.append((re.compile(regex), kind, variant, index))
    return _PARSERS


def _parsed_data(kind: str, variant: str, g: dict) -> dict:
    if kind in ("add", "sub", "mul"):
        return {"a": int(g["a"]), "b": int(g["b"])}
    if kind == "compare":
        return {"a": int(g["a"]), "b": int(g["b"]), "op": variant}
    if kind == "sort":
        return {"numbers": [int(x) for x in g["nums"].split(", ")]}
    if kind == "count":
        if variant == "letter":
            return {"mode": "letter", "letter": g["letter"], "word": g["word"]}
        return {"mode": "words", "sentence": g["sentence"]}
    if kind == "lookup":
        return {"table": variant, "key": g["key"]}
    return {"word": g["word"]}


def parse_task(prompt: str) -> Task | None:
    """The task a demo-style prompt asks, or None if it matches no template.

    A match is rebuilt from its fields and must give back the same prompt, so "What is 007 + 5?"
    (not a prompt the generator writes) and "What colour is an banana?" are not tasks."""
    text = prompt.strip()
    for regex, kind, variant, index in _parsers():
        m = regex.fullmatch(text)
        if m is None:
            continue
        task = _build(kind, _parsed_data(kind, variant, m.groupdict()), index)
        if task.prompt == text:
            return task
    return None


# --- checking -------------------------------------------------------------------------------

_QUOTES = "\"'`\u2018\u2019\u201c\u201d"
_EMPHASIS = "*_"        # Markdown's bold and italics, as instruct models mark an answer
_WORD = re.compile(r"[a-z][a-z'\u2019-]*[a-z]")
# Lead-ins that would let a hedge or a denial pass for the answer.
_NOT_LEAD_IN = {"or", "nor", "and", "than", "except", "but", "either"}
# A denial anywhere before the answer ("not", "it isn't", "it doesn't equal"), contractions with
# either apostrophe or none.
_NEGATIONS = {"not", "no", "never", "cannot", "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt",
              "cant", "wont", "hasnt", "havent", "couldnt", "shouldnt", "wouldnt"}
_CONTRACTED_NOT = re.compile(r"[a-z]+n['\u2019]t")


def _negates(word: str) -> bool:
    return word in _NEGATIONS or bool(_CONTRACTED_NOT.fullmatch(word))


def _words(text: str, kind: str) -> list[str]:
    s = text.strip().lower().rstrip(".!" + _QUOTES + _EMPHASIS + " \t")
    s = re.sub(r"([:=])", r" \1 ", s)
    if kind == "sort":
        s = re.sub(r"[,;\[\]()]", " ", s)
    return [w for w in (t.strip(_QUOTES + _EMPHASIS) for t in s.split()) if w]


def _first_line(response: str) -> str:
    for line in response.splitlines():
        if line.strip():
            return line
    return ""


def _lead_in(word: str) -> bool:
    # What may stand right before a trailing answer: "is", "answer:", "=", "...18?".
    if word in _NOT_LEAD_IN:
        return False
    return word in (":", "=", "a", "an") or word.endswith("?") or bool(_WORD.fullmatch(word))


def check(task: Task, response: str) -> bool:
    """Is the response correct? See the module docstring for the exact rule."""
    want = _words(task.answer, task.kind)
    got = _words(_first_line(response), task.kind)
    if not want or not got:
        return False
    if got == want:
        return True
    n = len(want)
    return (len(got) > n and got[-n:] == want and _lead_in(got[-n - 1])
            and not any(_negates(w) for w in got[:-n]))


def score(task: Task, response: str) -> float:
    """1.0 if correct; at most 0.5 for a `sort` or `reverse` answer with the right items in
    the wrong order (half the share of positions in place); else 0.0."""
    if check(task, response):
        return 1.0
    line = _first_line(response).lower()
    if task.kind == "sort":
        got = [int(x) for x in re.findall(r"\d+", line)]
        want = sorted(int(x) for x in task.answer.split(", "))
    elif task.kind == "reverse":
        words = re.findall(r"[a-z]+", line)
        got = list(words[-1]) if words else []
        want = list(task.answer.lower())
    else:
        return 0.0
    if not got or sorted(got) != sorted(want):
        return 0.0
    return 0.5 * sum(g == w for g, w in zip(got, want)) / len(want)


def task_accuracy(tasks: Sequence[Task], responses: Sequence[str]) -> dict:
    """{"overall", "score", "n", "per_kind": {kind: accuracy}, "n_per_kind": {kind: count}}.

    Kinds appear in KINDS order (then any others by name); an empty input gives 0.0."""
    if len(tasks) != len(responses):
        raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
    right: dict[str, int] = {}
    count: dict[str, int] = {}
    total_score = 0.0
    for task, response in zip(tasks, responses):
        ok = check(task, response)
        right[task.kind] = right.get(task.kind, 0) + ok
        count[task.kind] = count.get(task.kind, 0) + 1
        total_score += 1.0 if ok else score(task, response)
    order = [k for k in KINDS if k in count] + sorted(k for k in count if k not in KINDS)
    n = len(tasks)
    return {
        "overall": sum(right.values()) / n if n else 0.0,
        "score": total_score / n if n else 0.0,
        "n": n,
        "per_kind": {k: right[k] / count[k] for k in order},
        "n_per_kind": {k: count[k] for k in order},
    }


def as_transcript(task: Task) -> str:
    """The plain-text form the base model reads during pretraining."""
    return f"Question: {task.prompt}\nAnswer: {task.answer}\n"
