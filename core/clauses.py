"""Clauses of a token sequence (pure text, no files): the one rule the model diff and the score store share.

    clause_breaks(tokens) -> [bool]                  True where a clause closes after that token
    split_into_clauses(tokens, deltas) -> [clause]   clause spans with mean / max / min delta and token range
    clause_ids(tokens) -> [int | None]               the clause number of each token (None: a whitespace-only span)
"""
from __future__ import annotations

import math
import re
from typing import Sequence


# A clause closes after one of these characters (em dash included); a newline anywhere in a token closes one.
CLAUSE_END = frozenset(",.;:!?\u2014")
# Closing quotes and brackets stay with the clause they close: `He said "no."` closes after the quote.
_CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb")
_OPENERS = "\"'([{\u201c\u2018\u00ab"
# Words whose final period does not close a clause (lower-case, leading quotes / brackets removed).
ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "cf.", "vs.", "approx.", "dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "jr.", "sr.",
    "fig.", "eq.", "vol.", "inc.", "ltd.", "a.m.", "p.m.",
})
_DOTTED_INITIALS = re.compile(r"^(?:[a-z]\.){2,}$")     # u.s., e.g., i.e. and the like


def clause_breaks(tokens: Sequence[str]) -> list[bool]:
    """For each token, whether a clause closes right after it (the last token always closes one).

    A clause closes after `, . ; : ! ?` or an em dash (followed by any closing quotes / brackets), or a token
    holding a newline. Not after: a mark inside a number or word (`3.5`, `1,000`, `10:30`, `example.com`),
    an abbreviation (`e.g.`, `Dr.`, `U.S.`), or a mark that more punctuation follows (`...`, `?!`).
    """
    text = "".join(tokens)
    breaks, end = [], 0
    for i, tok in enumerate(tokens):
        start, end = end, end + len(tok)
        breaks.append(i == len(tokens) - 1 or "\n" in tok or _closes(text, start, end))
    return breaks


def _closes(text: str, start: int, end: int) -> bool:
    j = end
    while j > start and (text[j - 1] in _CLOSERS or text[j - 1] in " \t"):
        j -= 1
    if j == start:
        return False  # only closers / spaces: the mark before them already decided
    p = j - 1
    mark = text[p]
    if mark not in CLAUSE_END:
        return False
    nxt = text[end] if end < len(text) else ""
    if nxt and (nxt in CLAUSE_END or nxt in _CLOSERS):
        return False  # punctuation goes on ("...", "?!", '."'): close after the last of it
    if mark in ".,:" and p == end - 1 and p > 0 and text[p - 1].isalnum() and nxt.isalnum():
        return False  # inside a number or a word
    if mark == ".":
        ws = max(text.rfind(" ", 0, p), text.rfind("\n", 0, p), text.rfind("\t", 0, p))
        word = text[ws + 1:p + 1].lstrip(_OPENERS).lower()
        if word in ABBREVIATIONS or _DOTTED_INITIALS.match(word):
            return False
    return True


def split_into_clauses(tokens: Sequence[str], deltas: Sequence[float]) -> list[dict]:
    """Clauses in text order: {text, token_range [start, end), mean_delta, max_delta, min_delta, n_tokens}.

    A whitespace-only span (e.g. a lone newline) is not a clause; its tokens still count in the prompt's mean.
    """
    if len(tokens) != len(deltas):
        raise ValueError(f"{len(tokens)} tokens but {len(deltas)} deltas")
    clauses, start = [], 0
    for i, closes in enumerate(clause_breaks(tokens)):
        if not closes:
            continue
        text = "".join(tokens[start:i + 1])
        if text.strip():
            span = [float(d) for d in deltas[start:i + 1]]
            clauses.append({"text": text, "token_range": [start, i + 1], "mean_delta": math.fsum(span) / len(span),
                            "max_delta": max(span), "min_delta": min(span), "n_tokens": len(span)})
        start = i + 1
    return clauses


def clause_ids(tokens: Sequence[str]) -> list[int | None]:
    """Each token's clause number in text order, as split_into_clauses counts clauses; None for the tokens of a
    whitespace-only span (not a clause)."""
    out: list[int | None] = []
    start, n = 0, 0
    for i, closes in enumerate(clause_breaks(tokens)):
        if not closes:
            continue
        if "".join(tokens[start:i + 1]).strip():
            out.extend([n] * (i + 1 - start))
            n += 1
        else:
            out.extend([None] * (i + 1 - start))
        start = i + 1
    return out
