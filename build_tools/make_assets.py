#!/usr/bin/env python3
"""Regenerate the small assets under ``realhf/assets``: tokenizer and datasets.

Tests must never reach a model or data hub, so everything they need is built
here from two sources and committed:

* the six novels of Jane Austen (public-domain text), taken from the Debian
  package ``r-cran-janeaustenr`` (MIT) with ``apt-get download`` and
  ``dpkg-deb -x``, and parsed with the ``rdata`` package (no R needed);
* templated arithmetic and word problems with verifiable integer answers.

Usage::

    python build_tools/make_assets.py                  # writes realhf/assets
    python build_tools/make_assets.py --out DIR --deb r-cran-janeaustenr_1.0.0-1_all.deb

Every random choice flows from ``--seed``; running twice gives byte-identical
files (checked with ``--check``, which builds twice and compares).
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import glob
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from typing import Callable, Iterable, Sequence

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_BOOKS = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
# Line count of the six novels in janeaustenr 1.0.0; a different count means
# a different upstream text and therefore different generated assets.
AUSTEN_EXPECTED_LINES = 73422
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)
QUESTION_TEMPLATE = "Question: {q}\nAnswer:"

# Records per file.  Counts are small so the whole folder stays near 2 MB.
SIZES = {
    "sft": (2000, 200),
    "rw_pair": (1500, 200),
    "prompt": (2000, 200),
}
SFT_MATH_FRACTION = 0.6
RW_MATH_FRACTION = 0.75


# --------------------------------------------------------------------------
# Austen text
# --------------------------------------------------------------------------


def fetch_austen_deb(workdir: str) -> str:
    """Download the Debian package into ``workdir`` and return the .deb path."""
    if shutil.which("apt-get") is None:
        raise SystemExit(
            "apt-get is not available: run this on a Debian/Ubuntu system, or "
            f"download {AUSTEN_PACKAGE}_*.deb elsewhere and pass it with --deb."
        )
    proc = subprocess.run(
        ["apt-get", "download", AUSTEN_PACKAGE],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    debs = sorted(glob.glob(os.path.join(workdir, f"{AUSTEN_PACKAGE}_*.deb")))
    if proc.returncode != 0 or not debs:
        raise SystemExit(
            f"`apt-get download {AUSTEN_PACKAGE}` failed (exit {proc.returncode}). "
            "Run `apt-get update` first or pass a local file with --deb.\n"
            + proc.stderr.strip()
        )
    return debs[0]


def extract_austen(deb_path: str, workdir: str) -> dict[str, list[str]]:
    """Unpack the .deb and read the six novels as lists of lines."""
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("dpkg-deb is not available; it is needed to unpack the .deb.")
    import warnings

    import rdata

    root = os.path.join(workdir, "deb")
    subprocess.run(["dpkg-deb", "-x", deb_path, root], check=True)
    found = glob.glob(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data"))
    if not found:
        raise SystemExit(f"{deb_path} does not contain janeaustenr/data")
    data_dir = found[0]

    def convert(raw: bytes):
        # Lazy-load databases hold bare serialized objects; rdata warns that
        # it has to assume the RDS layout, which is exactly right here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    with open(os.path.join(data_dir, "Rdata.rdx"), "rb") as f:
        index = convert(gzip.decompress(f.read()))["variables"]
    with open(os.path.join(data_dir, "Rdata.rdb"), "rb") as f:
        blob = f.read()
    books: dict[str, list[str]] = {}
    for name, (offset, length) in index.items():
        start, end = int(offset), int(offset) + int(length)
        # Each entry is a 4-byte length header followed by a zlib stream.
        books[str(name)] = [str(x) for x in convert(zlib.decompress(blob[start + 4 : end]))]
    missing = set(AUSTEN_BOOKS) - set(books)
    if missing:
        raise SystemExit(f"novels missing from {deb_path}: {sorted(missing)}")
    total = sum(len(books[b]) for b in AUSTEN_BOOKS)
    if total != AUSTEN_EXPECTED_LINES:
        raise SystemExit(
            f"expected {AUSTEN_EXPECTED_LINES} lines in the six novels, got {total}; "
            "the upstream text changed, so the assets would not be reproducible."
        )
    return {b: books[b] for b in AUSTEN_BOOKS}


_HEADING = re.compile(r"^(chapter|volume|book|end of|finis)\b", re.IGNORECASE)
_ABBREV = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Col|Capt|Messrs|Esq|Sir)\.$")
_SENT_SPLIT = re.compile(r"(?<=[.!?])(?:[\"'])?\s+(?=[\"'A-Z])")


def paragraphs(lines: Sequence[str]) -> list[str]:
    """Join wrapped lines into paragraphs and drop headings and front matter."""
    out: list[str] = []
    cur: list[str] = []
    for line in list(lines) + [""]:
        if line.strip():
            cur.append(line.strip())
            continue
        if cur:
            text = re.sub(r"\s+", " ", " ".join(cur)).replace("_", "")
            if len(text) >= 40 and not _HEADING.match(text) and text.upper() != text:
                out.append(text)
            cur = []
    return out


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences, keeping titles like "Mr." intact."""
    pieces: list[str] = []
    pos = 0
    for m in _SENT_SPLIT.finditer(paragraph):
        # The match swallows a closing quote, so it stays with its sentence.
        pieces.append(paragraph[pos : m.end()].strip())
        pos = m.end()
    pieces.append(paragraph[pos:].strip())
    merged: list[str] = []
    for p in pieces:
        if merged and _ABBREV.search(merged[-1]):
            merged[-1] = merged[-1] + " " + p
        else:
            merged.append(p)
    return [s for s in merged if s]


@dataclasses.dataclass(frozen=True)
class Passage:
    """A context of one or two sentences and the sentence that follows."""

    book: str
    context: str
    continuation: str


def austen_passages(books: dict[str, list[str]]) -> list[Passage]:
    """All usable (context, next sentence) pairs."""
    passages: list[Passage] = []
    for book in AUSTEN_BOOKS:
        for para in paragraphs(books[book]):
            sents = split_sentences(para)
            for i in range(1, len(sents)):
                # Alternate one- and two-sentence contexts for variety.
                k = 2 if (i >= 2 and i % 2 == 0) else 1
                ctx = " ".join(sents[i - k : i])
                if 6 <= len(ctx.split()) <= 60 and 4 <= len(sents[i].split()) <= 35:
                    passages.append(Passage(book, ctx, sents[i]))
    return passages


# --------------------------------------------------------------------------
# Arithmetic and word problems
# --------------------------------------------------------------------------


class Chain:
    """Records each arithmetic step of a chain of thought."""

    def __init__(self) -> None:
        self.count = 0

    def op(self, a: int, sym: str, b: int) -> tuple[int, str]:
        if sym == "+":
            val = a + b
        elif sym == "-":
            val = a - b
        elif sym == "*":
            val = a * b
        elif sym == "/":
            val = a // b
        else:
            raise ValueError(sym)
        self.count += 1
        return val, f"{a} {sym} {b} = {val}"


NAMES = [
    ("Anna", "she"), ("Ben", "he"), ("Clara", "she"), ("David", "he"), ("Elena", "she"),
    ("Felix", "he"), ("Grace", "she"), ("Henry", "he"), ("Iris", "she"), ("Jack", "he"),
    ("Kira", "she"), ("Leo", "he"), ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"),
    ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"), ("Tara", "she"), ("Victor", "he"),
]
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("book", "books"), ("marble", "marbles"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("card", "cards"), ("shell", "shells"),
    ("orange", "oranges"), ("toy car", "toy cars"), ("egg", "eggs"), ("candle", "candles"),
]
SHOP = [
    ("notebook", "notebooks"), ("pen", "pens"), ("mug", "mugs"), ("ticket", "tickets"),
    ("sandwich", "sandwiches"), ("plant", "plants"), ("ball", "balls"), ("scarf", "scarves"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A rendered problem: question, chain of thought, integer answer."""

    template: str
    level: int
    question: str
    cot: str
    answer: int
    n_steps: int


def _hi(level: int) -> int:
    return {1: 20, 2: 50, 3: 100}[level]


def _who(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES)


def _t_arith(rng: random.Random, level: int) -> dict:
    hi = _hi(level)
    if level == 1:
        sym = rng.choice("+-*")
        a, b = rng.randint(2, hi), rng.randint(2, hi if sym != "*" else 12)
        if sym == "-" and b > a:
            a, b = b, a
        return {"kind": "one", "a": a, "b": b, "sym": sym}
    if level == 2:
        return {"kind": "two", "a": rng.randint(2, hi), "b": rng.randint(2, 12), "c": rng.randint(2, 12)}
    return {
        "kind": "three", "a": rng.randint(2, 30), "b": rng.randint(2, 30),
        "c": rng.randint(2, 9), "d": rng.randint(1, 40),
    }


def _r_arith(p: dict, c: Chain) -> tuple[str, list[str], int]:
    if p["kind"] == "one":
        words = {"+": "plus", "-": "minus", "*": "times"}[p["sym"]]
        v, e = c.op(p["a"], p["sym"], p["b"])
        return f"What is {p['a']} {words} {p['b']}?", [f"{e}."], v
    if p["kind"] == "two":
        x, e1 = c.op(p["b"], "*", p["c"])
        v, e2 = c.op(p["a"], "+", x)
        q = f"What is {p['a']} + {p['b']} * {p['c']}?"
        return q, [f"First multiply: {e1}.", f"Then add: {e2}."], v
    x, e1 = c.op(p["a"], "+", p["b"])
    y, e2 = c.op(x, "*", p["c"])
    v, e3 = c.op(y, "-", p["d"])
    q = f"What is ({p['a']} + {p['b']}) * {p['c']} - {p['d']}?"
    return q, [f"Inside the brackets: {e1}.", f"Multiply: {e2}.", f"Subtract: {e3}."], v


def _t_pages(rng: random.Random, level: int) -> dict:
    n = level + 1
    return {"who": _who(rng), "vals": [rng.randint(3, _hi(level)) for _ in range(n)]}


def _r_pages(p: dict, c: Chain) -> tuple[str, list[str], int]:
    name, pron = p["who"]
    vals = p["vals"]
    parts = [f"{v} pages on {d}" for v, d in zip(vals, DAYS)]
    listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    q = f"{name} read {listing}. How many pages did {pron} read in total?"
    total, steps = vals[0], []
    for v in vals[1:]:
        total, e = c.op(total, "+", v)
        steps.append(f"{e}.")
    steps[0] = f"Adding day by day: {steps[0]}"
    return q, steps, total


def _t_price(rng: random.Random, level: int) -> dict:
    items = rng.sample(SHOP, 2)
    n1, p1 = rng.randint(2, 9), rng.randint(2, 12 if level < 3 else 25)
    n2, p2 = rng.randint(2, 6), rng.randint(1, 10)
    cost = n1 * p1 + (n2 * p2 if level == 3 else 0)
    bill = next(b for b in (10, 20, 50, 100, 200, 500) if b >= cost)
    return {"who": _who(rng), "items": items, "n1": n1, "p1": p1, "n2": n2, "p2": p2,
            "bill": bill, "level": level}


def _r_price(p: dict, c: Chain) -> tuple[str, list[str], int]:
    name, pron = p["who"]
    (s1, pl1), (s2, pl2) = p["items"]
    lv = p["level"]
    cost1, e1 = c.op(p["n1"], "*", p["p1"])
    if lv == 1:
        q = f"One {s1} costs {p['p1']} dollars. How much do {p['n1']} {pl1} cost, in dollars?"
        return q, [f"{p['n1']} {pl1} cost {e1} dollars."], cost1
    if lv == 2:
        q = (f"{name} buys {p['n1']} {pl1} at {p['p1']} dollars each and pays with a "
             f"{p['bill']}-dollar bill. How much change does {pron} get, in dollars?")
        v, e2 = c.op(p["bill"], "-", cost1)
        return q, [f"The {pl1} cost {e1} dollars.", f"The change is {e2} dollars."], v
    cost2, e2 = c.op(p["n2"], "*", p["p2"])
    tot, e3 = c.op(cost1, "+", cost2)
    v, e4 = c.op(p["bill"], "-", tot)
    q = (f"{name} buys {p['n1']} {pl1} at {p['p1']} dollars each and {p['n2']} {pl2} at "
         f"{p['p2']} dollars each. {pron.capitalize()} pays with a {p['bill']}-dollar bill. "
         f"How much change does {pron} get, in dollars?")
    steps = [f"The {pl1} cost {e1} dollars.", f"The {pl2} cost {e2} dollars.",
             f"Together that is {e3} dollars.", f"The change is {e4} dollars."]
    return q, steps, v


def _t_ages(rng: random.Random, level: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    return {"a": a, "b": b, "d": rng.randint(2, 15), "age": rng.randint(3, 40),
            "k": rng.randint(2, 20), "m": rng.randint(2, 3), "level": level}


def _r_ages(p: dict, c: Chain) -> tuple[str, list[str], int]:
    (na, _), (nb, _) = p["a"], p["b"]
    lv = p["level"]
    intro = f"{na} is {p['d']} years older than {nb}. {nb} is {p['age']} years old."
    x, e1 = c.op(p["age"], "+", p["d"])
    if lv == 1:
        return f"{intro} How old is {na}?", [f"{na} is {e1} years old."], x
    y, e2 = c.op(x, "+", p["k"])
    if lv == 2:
        q = f"{intro} How old will {na} be in {p['k']} years?"
        return q, [f"{na} is {e1} years old now.", f"In {p['k']} years {na} will be {e2}."], y
    z, e3 = c.op(y, "*", p["m"])
    times = {2: "twice", 3: "three times"}[p["m"]]
    q = (f"{intro} In {p['k']} years, a house will be {times} as old as {na} is then. "
         f"How old will the house be at that time?")
    steps = [f"{na} is {e1} years old now.", f"In {p['k']} years {na} will be {e2}.",
             f"The house will be {e3} years old."]
    return q, steps, z


def _t_left(rng: random.Random, level: int) -> dict:
    hi = _hi(level)
    start = rng.randint(10, hi + 10)
    gave = rng.randint(1, start - 2)
    bought = rng.randint(2, hi)
    k = rng.randint(2, 6)
    have = start - gave + bought
    extra = (-have) % k  # make the final share an exact division
    return {"who": _who(rng), "item": rng.choice(ITEMS), "start": start, "gave": gave,
            "bought": bought + extra, "k": k, "level": level}


def _r_left(p: dict, c: Chain) -> tuple[str, list[str], int]:
    name, pron = p["who"]
    _, things = p["item"]
    lv = p["level"]
    q = f"{name} had {p['start']} {things}. {pron.capitalize()} gave away {p['gave']}"
    x, e1 = c.op(p["start"], "-", p["gave"])
    steps = [f"After giving some away: {e1}."]
    if lv == 1:
        return q + f". How many {things} does {name} have left?", steps, x
    y, e2 = c.op(x, "+", p["bought"])
    steps.append(f"After buying more: {e2}.")
    q += f" and then bought {p['bought']} more"
    if lv == 2:
        return q + f". How many {things} does {name} have now?", steps, y
    z, e3 = c.op(y, "/", p["k"])
    steps.append(f"Shared among {p['k']} bags: {e3}.")
    q += f". {pron.capitalize()} puts them equally into {p['k']} bags. How many {things} go in each bag?"
    return q, steps, z


def _t_groups(rng: random.Random, level: int) -> dict:
    a, b = rng.randint(2, 12), rng.randint(2, 12 if level < 3 else 20)
    return {"item": rng.choice(ITEMS), "a": a, "b": b, "broken": rng.randint(1, a * b - 1),
            "more": rng.randint(2, 9), "level": level}


def _r_groups(p: dict, c: Chain) -> tuple[str, list[str], int]:
    _, things = p["item"]
    lv = p["level"]
    q = f"There are {p['a']} boxes with {p['b']} {things} in each box."
    x, e1 = c.op(p["a"], "*", p["b"])
    steps = [f"The boxes hold {e1} {things}."]
    if lv == 1:
        return q + f" How many {things} are there in all?", steps, x
    if lv == 3:
        x2, e0 = c.op(p["more"], "*", p["b"])
        x, e2 = c.op(x, "+", x2)
        steps += [f"The extra boxes hold {e0}.", f"Altogether: {e2}."]
        q += f" Then {p['more']} more boxes of the same size arrive."
    v, e3 = c.op(x, "-", p["broken"])
    steps.append(f"After removing the damaged ones: {e3}.")
    return q + f" {p['broken']} {things} are damaged and thrown away. How many {things} are left?", steps, v


def _t_travel(rng: random.Random, level: int) -> dict:
    return {"who": _who(rng), "v1": rng.randint(3, 12) * 5, "t1": rng.randint(2, 6),
            "v2": rng.randint(3, 12) * 5, "t2": rng.randint(2, 4), "back": rng.randint(5, 40),
            "level": level}


def _r_travel(p: dict, c: Chain) -> tuple[str, list[str], int]:
    name, pron = p["who"]
    lv = p["level"]
    q = f"{name} drives at {p['v1']} km per hour for {p['t1']} hours"
    d1, e1 = c.op(p["v1"], "*", p["t1"])
    steps = [f"The first part is {e1} km."]
    if lv == 1:
        return q + f". How many km does {pron} drive?", steps, d1
    d2, e2 = c.op(p["v2"], "*", p["t2"])
    tot, e3 = c.op(d1, "+", d2)
    steps += [f"The second part is {e2} km.", f"In total: {e3} km."]
    q += f", then at {p['v2']} km per hour for {p['t2']} hours"
    if lv == 2:
        return q + f". How many km does {pron} drive in total?", steps, tot
    v, e4 = c.op(tot, "-", p["back"])
    steps.append(f"Without the detour: {e4} km.")
    return q + f". {p['back']} km of that was a detour. How many km were not detour?", steps, v


TEMPLATES: dict[str, tuple[Callable[[random.Random, int], dict], Callable]] = {
    "arith": (_t_arith, _r_arith),
    "pages": (_t_pages, _r_pages),
    "price": (_t_price, _r_price),
    "ages": (_t_ages, _r_ages),
    "left": (_t_left, _r_left),
    "groups": (_t_groups, _r_groups),
    "travel": (_t_travel, _r_travel),
}


def format_cot(steps: list[str], answer: int) -> str:
    return " ".join(steps) + f"\n#### {answer}"


@dataclasses.dataclass(frozen=True)
class Drawn:
    """Parameters of one problem, so it can be rendered again."""

    template: str
    level: int
    params: dict

    def render(self) -> Problem:
        chain = Chain()
        q, steps, ans = TEMPLATES[self.template][1](self.params, chain)
        return Problem(self.template, self.level, q, format_cot(steps, ans), ans, chain.count)


def draw_problems(rng: random.Random, n: int, levels: Sequence[int]) -> list[Drawn]:
    """Draw ``n`` problems with distinct questions and non-negative answers."""
    names = sorted(TEMPLATES)
    out: list[Drawn] = []
    seen: set[str] = set()
    while len(out) < n:
        t, lv = rng.choice(names), rng.choice(list(levels))
        d = Drawn(t, lv, TEMPLATES[t][0](rng, lv))
        p = d.render()
        if p.answer < 0 or p.question in seen:
            continue
        seen.add(p.question)
        out.append(d)
    return out


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------


def math_prompt(p: Problem) -> str:
    return QUESTION_TEMPLATE.format(q=p.question)


def build_sft(rng: random.Random, split: str, n: int, math: list[Drawn],
              passages: list[Passage]) -> list[dict]:
    n_math = round(n * SFT_MATH_FRACTION)
    rows: list[tuple[str, str, str]] = []
    for d in math[:n_math]:
        p = d.render()
        rows.append((f"math-l{p.level}", math_prompt(p), " " + p.cot))
    for ps in passages[: n - n_math]:
        rows.append((f"austen-{ps.book}", ps.context, " " + ps.continuation))
    rng.shuffle(rows)
    return [{"id": f"sft-{split}-{i:05d}-{kind}", "prompt": pr, "answer": ans}
            for i, (kind, pr, ans) in enumerate(rows)]


def _unfinished(rng: random.Random, text: str) -> str:
    """``text`` cut at a word boundary (30-80% of its words), before any final answer line."""
    words = text.split("\n#### ")[0].split(" ")
    keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.8))))
    return " ".join(words[:keep])


def _shuffled(rng: random.Random, text: str) -> str | None:
    """The same words in another order, or None when the order cannot change."""
    words = text.split()
    if len(set(words)) < 2:
        return None
    out = list(words)
    while out == words:
        rng.shuffle(out)
    return " ".join(out)


def _math_negative(rng: random.Random, d: Drawn, others: list[Drawn], kind: str) -> str:
    true = d.render()
    if kind == "unfinished":
        return " " + _unfinished(rng, true.cot)
    # Another problem's solution: fluent and complete, but its numbers ignore the question.
    while True:
        o = rng.choice(others).render()
        if o.answer != true.answer:
            return " " + o.cot


def _prose_negative(rng: random.Random, continuation: str, kind: str) -> str:
    if kind == "shuffled":
        shuffled = _shuffled(rng, continuation)
        if shuffled is not None:
            return " " + shuffled
    return " " + _unfinished(rng, continuation)


def build_rw(rng: random.Random, split: str, n: int, math: list[Drawn], others: list[Drawn],
             passages: list[Passage]) -> list[dict]:
    """Preference pairs whose rejected answers are off-topic, unfinished or scrambled.

    Each kind is a preference a small reward model can learn from text alone
    (no arithmetic): a prompt with two pairs gets both kinds of its domain,
    a prompt with one pair gets one of them at random.
    """
    n_math = round(n * RW_MATH_FRACTION)
    rows: list[tuple[str, str, list[str], list[str]]] = []
    for d in math[:n_math]:
        p = d.render()
        kinds = _negative_kinds(rng, ["other", "unfinished"])
        negs = [_math_negative(rng, d, others, kd) for kd in kinds]
        rows.append((f"math-l{p.level}", math_prompt(p), [" " + p.cot] * len(kinds), negs))
    for ps in passages[: n - n_math]:
        kinds = _negative_kinds(rng, ["shuffled", "unfinished"])
        negs = [_prose_negative(rng, ps.continuation, kd) for kd in kinds]
        rows.append((f"austen-{ps.book}", ps.context, [" " + ps.continuation] * len(kinds), negs))
    rng.shuffle(rows)
    return [{"id": f"rw-{split}-{i:05d}-{kind}", "prompt": pr, "pos_answers": pos,
             "neg_answers": neg} for i, (kind, pr, pos, neg) in enumerate(rows)]


def _negative_kinds(rng: random.Random, kinds: list[str]) -> list[str]:
    return list(kinds) if rng.choice([1, 2]) == 2 else [rng.choice(kinds)]


def build_prompts(rng: random.Random, split: str, math: list[Drawn]) -> list[dict]:
    problems = [d.render() for d in math]
    rng.shuffle(problems)
    return [{"id": f"prompt-{split}-{i:05d}-l{p.level}", "prompt": math_prompt(p),
             "answer": str(p.answer)} for i, p in enumerate(problems)]


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(texts: list[str], out_dir: str) -> None:
    """Train a byte-level BPE and save it in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    hf.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    # Name the generic fast class so that transformers 4.x loads it as well
    # (5.x maps it to its tokenizers backend either way).
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    again = AutoTokenizer.from_pretrained(out_dir)
    sample = texts[0][:500] + "\nQuestion: What is 12 + 7?\nAnswer: 12 + 7 = 19.\n#### 19"
    if again(sample)["input_ids"] != hf(sample)["input_ids"] or len(again) != VOCAB_SIZE:
        raise SystemExit("the saved tokenizer does not reload identically")
    if again.decode(again(sample)["input_ids"]) != sample:
        raise SystemExit("the tokenizer does not round-trip text")


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def build(out: str, seed: int, deb: str | None) -> dict[str, int]:
    """Build every asset into ``out``; return record counts per file."""
    with tempfile.TemporaryDirectory() as tmp:
        deb_path = deb or fetch_austen_deb(tmp)
        books = extract_austen(deb_path, tmp)
    passages = austen_passages(books)

    rng = random.Random(f"{seed}-passages")
    passages = sorted(passages, key=lambda p: (p.book, p.context, p.continuation))
    rng.shuffle(passages)
    (sft_tr, sft_va), (rw_tr, rw_va), (pr_tr, pr_va) = SIZES.values()
    n_sft_austen = [n - round(n * SFT_MATH_FRACTION) for n in (sft_tr, sft_va)]
    n_rw_austen = [n - round(n * RW_MATH_FRACTION) for n in (rw_tr, rw_va)]
    cuts = list(_cumsum(n_sft_austen + n_rw_austen))
    p_sft_tr, p_sft_va, p_rw_tr, p_rw_va = (passages[a:b] for a, b in zip([0] + cuts, cuts))

    # One pool of distinct problems, cut into disjoint slices per file.
    mrng = random.Random(f"{seed}-problems")
    hard = draw_problems(mrng, sum(round(n * SFT_MATH_FRACTION) for n in (sft_tr, sft_va))
                         + sum(round(n * RW_MATH_FRACTION) for n in (rw_tr, rw_va)), (1, 2, 3))
    seen = {d.render().question for d in hard}
    easy = [d for d in draw_problems(mrng, pr_tr + pr_va + len(hard), (1, 2))
            if d.render().question not in seen][: pr_tr + pr_va]
    n_sft = [round(n * SFT_MATH_FRACTION) for n in (sft_tr, sft_va)]
    n_rw = [round(n * RW_MATH_FRACTION) for n in (rw_tr, rw_va)]
    mcuts = list(_cumsum(n_sft + n_rw))
    m_sft_tr, m_sft_va, m_rw_tr, m_rw_va = (hard[a:b] for a, b in zip([0] + mcuts, mcuts))

    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    files = {
        "sft-train": build_sft(random.Random(f"{seed}-sft-train"), "train", sft_tr, m_sft_tr, p_sft_tr),
        "sft-valid": build_sft(random.Random(f"{seed}-sft-valid"), "valid", sft_va, m_sft_va, p_sft_va),
        "rw_pair-train": build_rw(random.Random(f"{seed}-rw-train"), "train", rw_tr, m_rw_tr,
                                  m_rw_tr, p_rw_tr),
        "rw_pair-valid": build_rw(random.Random(f"{seed}-rw-valid"), "valid", rw_va, m_rw_va,
                                  m_rw_va, p_rw_va),
        "prompt-train": build_prompts(random.Random(f"{seed}-prompt-train"), "train", easy[:pr_tr]),
        "prompt-valid": build_prompts(random.Random(f"{seed}-prompt-valid"), "valid", easy[pr_tr:]),
    }
    for name, rows in files.items():
        write_jsonl(os.path.join(data_dir, f"{name}.jsonl"), rows)

    # Tokenizer corpus: all paragraphs of the novels plus every generated problem.
    corpus = [para for b in AUSTEN_BOOKS for para in paragraphs(books[b])]
    for d in hard + easy:
        p = d.render()
        corpus.append(math_prompt(p) + " " + p.cot)
    train_tokenizer(corpus, os.path.join(out, "tokenizer"))
    return {k: len(v) for k, v in files.items()}


def _cumsum(xs: Sequence[int]) -> Iterable[int]:
    total = 0
    for x in xs:
        total += x
        yield total


GENERATED_DIRS = ("data", "tokenizer")


def _same_tree(a: str, b: str) -> list[str]:
    """Generated files that differ between two output folders."""
    diffs = []
    for sub in GENERATED_DIRS:
        names = set(os.listdir(os.path.join(a, sub))) | set(os.listdir(os.path.join(b, sub)))
        for fn in sorted(names):
            pa, pb = os.path.join(a, sub, fn), os.path.join(b, sub, fn)
            if not (os.path.exists(pa) and os.path.exists(pb)) or not filecmp.cmp(pa, pb, shallow=False):
                diffs.append(os.path.join(sub, fn))
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "realhf", "assets")
    ap.add_argument("--out", default=default_out, help="output folder (default: realhf/assets)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--deb", default=None, help=f"a local {AUSTEN_PACKAGE} .deb instead of apt-get")
    ap.add_argument("--check", action="store_true",
                    help="build a second copy in a temp folder and require identical files")
    args = ap.parse_args(argv)

    deb = args.deb
    keep = None
    if args.check and deb is None:
        keep = tempfile.mkdtemp()
        deb = fetch_austen_deb(keep)
    counts = build(args.out, args.seed, deb)
    for name, n in counts.items():
        print(f"{name}: {n} records")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(tmp, args.seed, deb)
            diffs = _same_tree(args.out, tmp)
        if keep:
            shutil.rmtree(keep)
        if diffs:
            print("not reproducible:", diffs, file=sys.stderr)
            return 1
        print("reproducible: a second build is byte-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
