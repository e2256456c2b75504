"""Automatic detection of SMILES, protein and nucleic-acid spans in running text.

The reference decides, for each piece of plain text outside explicit domain tags and `<MOLFORMULA>`, three
times in turn (SMILES, then protein, then DNA/RNA): find candidates with a regex, keep those that pass the
module's checks, and wrap each in transient markers such as `<SMILES_AUTO_DETECT>`. Later stages leave
wrapped spans alone. The markers are plain strings in the reference, so a piece of user text that happens to
spell a marker acts as one; we keep that behaviour by working on the same list of strings.

SMILES legitimacy follows the reference's rule-based check, which it uses when RDKit is not importable (the
default install of every serving framework).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import lru_cache

SMILES, PROTEIN, XNA = "SMILES", "PROT", "XNA"
AUTO_BEGIN = {f"<{name}_AUTO_DETECT>": name for name in (SMILES, PROTEIN, XNA)}
AUTO_END = {f"</{name}_AUTO_DETECT>": name for name in (SMILES, PROTEIN, XNA)}

# Element symbols the SMILES candidate regex knows (its own list, not the periodic table below).
_REGEX_TWO_LETTER = (
    "Ac Ag Al Am Ar As At Au Ba Be Bh Bi Bk Br Ca Cd Ce Cf Cl Cm Cn Co Cr Cs Cu Db Ds Dy Er Es Eu Fe Fl Fm Fr "
    "Ga Gd Ge He Hf Hg Ho Hs In Ir Kr La Li Lr Lu Lv Mc Md Mg Mn Mo Mt Na Nb Nd Ne Nh Ni No Np Og Os Pa Pb Pd "
    "Pm Po Pr Pt Pu Ra Rb Re Rf Rg Rh Rn Ru Sb Sc Se Sg Si Sm Sn Sr Ta Tb Tc Te Th Ti Tl Tm Ts Xe Yb Zn Zr"
).split()
_REGEX_ONE_LETTER = "B C F H I K N O P S U V W Y b c n o p s".split()
_SMILES_SYMBOLS = r"()\.=\-#@\d$%*:+/\\"


def _unit_pattern() -> str:
    """One SMILES unit: a bracket atom, else a two-letter element, else a one-letter element, else a symbol.
    Written as one branch per first letter ("C[adeflmnorsu]?" tries the two-letter symbols before "C"),
    which picks the same unit as the reference's long alternation, several times faster."""
    second: dict[str, str] = {}
    for symbol in _REGEX_TWO_LETTER:
        second[symbol[0]] = second.get(symbol[0], "") + symbol[1]
    single = {s for s in _REGEX_ONE_LETTER if s.isupper()}
    branches = [r"\[[^\]]+\]"]
    for first in sorted(second.keys() | single):
        if first not in second:
            branches.append(first)
        else:
            branches.append(f"{first}[{second[first]}]" + ("?" if first in single else ""))
    lower = "".join(sorted(s for s in _REGEX_ONE_LETTER if s.islower()))
    branches.append(f"[{lower}{_SMILES_SYMBOLS}]")
    return "|".join(branches)


# Each unit is taken whole (the reference uses an atomic group); `(?=(...))\1` is the same thing in `re`
# and works before Python 3.11.
_SMILES_CANDIDATE = re.compile(rf"(?![:.=])(?:(?=({_unit_pattern()}))\1){{10,}}(?<![:.=])")

# A candidate is a chain of at least ten items, each a bracket atom or one character a unit can hold, so it
# lies inside a maximal run of such items; the candidate regex looks at nothing outside its match, so each
# run can be searched on its own. A character-class scan finds the runs fast (without '[' in the text it
# needs no alternation at all) and skips ordinary prose.
_UNIT_CHARS = "".join(sorted(set("".join(_REGEX_TWO_LETTER + _REGEX_ONE_LETTER)))) + _SMILES_SYMBOLS
_SMILES_RUN = re.compile(rf"[{_UNIT_CHARS}]{{10,}}")
_SMILES_RUN_WITH_BRACKETS = re.compile(rf"(?:[{_UNIT_CHARS}]|\[[^\]]+\]){{10,}}")
# Finer, inside those runs: a lowercase letter other than b c n o p s only ever follows a capital, so
# ordinary words drop out here before the (slower) candidate regex sees them.
_SMILES_ITEMS = re.compile(rf"(?:[A-Z][a-z]?|[bcnops{_SMILES_SYMBOLS}]|\[[^\]]+\]){{10,}}")
# Coarser, and cheap: outside bracket atoms the SMILES check accepts only organic-subset atoms (Cl and Br
# taken letter by letter here), bonds, parentheses, digits and '%'; a candidate that passes is at least ten
# of those in a row, so a run without such a stretch holds no SMILES (whatever candidates it holds).
_SMILES_PASSABLE = re.compile(r"(?:[BCFINOPSbclnoprs()\d%=#:/\\.$-]|\[[^\]]+\]){10}")

# A character a detected span may begin with: '[' (a bracket atom), a capital (an element, an amino acid, a
# nucleotide), an aromatic atom, or a SMILES symbol other than ':', '.' and '=' (no candidate starts so).
SPAN_START = r"[\[A-Zbcnops()\-#@\d$%*+/\\]"

_PROTEIN_CANDIDATE = re.compile(r"[A-Z]{27,}")
_XNA_CANDIDATE = re.compile(r"[ATCGU]{27,}")
_XNA_ONLY = re.compile(r"[ATCGU]+")

# The rule-based SMILES check.
_BONDS = frozenset("-=#:/\\.$")
_ORGANIC = ("B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I")
_AROMATIC = ("b", "c", "n", "o", "s", "p")
_ALLOWED_ONE = frozenset(s for s in _ORGANIC + _AROMATIC if len(s) == 1) | _BONDS | frozenset("[]();")
_ALLOWED_TWO = frozenset(s for s in _ORGANIC if len(s) == 2)
_PERIODIC_TABLE = frozenset(
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb Sr "
    "Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W "
    "Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt "
    "Ds Rg Cn Nh Fl Mc Lv Ts Og".split()
)
_ADJACENT_BONDS = re.compile(r"[-=#:/\\.$]{2}")
_ASCII_UPPER = re.compile("[A-Z]")
_FIVE_LETTERS = re.compile("(?:[^A-Za-z]*[A-Za-z]){5}")
_BRACKET_WORD = re.compile(r"(?:[A-GI-Z]|[a-z]){3,}")
_BRACKET_LONG_NUMBER = re.compile(r"\d{4,}")
_NUMBERS = re.compile(r"\d+")
_BRACKET_BODIES = re.compile(r"\[([^\[\]]*)\]")


def _is_ascii_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


@lru_cache(maxsize=4096)
def _is_smiles(candidate: str) -> bool:
    """The reference's rule-based SMILES check (used when RDKit is absent): at least five ASCII letters and
    a hand-written grammar check."""
    return _FIVE_LETTERS.match(candidate) is not None and _rings_and_brackets_ok(candidate)


def _rings_and_brackets_ok(s: str) -> bool:
    """The reference's grammar check, rule for rule, quirks included (e.g. a bracket body is always cut at
    the first ']' of the whole candidate). Its bond rules (no bond first, last, or next to another bond)
    hold for every position it visits, and it skips only letters and digits, so they are tested on the
    whole string up front."""
    if s[0] in _BONDS or s[-1] in _BONDS or _ADJACENT_BONDS.search(s):
        return False
    n = len(s)
    first_close = s.find("]")
    rings: dict[str, bool] = {}  # ring-bond label -> open
    open_sq = close_sq = open_paren = close_paren = ring_marks = 0
    pos = 0
    while pos < n:
        c = s[pos]
        if c == "[":
            open_sq += 1
            if open_sq > close_sq + 1 or pos == n - 1 or s.find("]", pos + 1) < 0:
                return False
            body = s[pos + 1 : first_close]
            if _BRACKET_WORD.search(body) or _BRACKET_LONG_NUMBER.search(body) or len(_NUMBERS.findall(body)) > 2:
                return False
        elif c == "]":
            close_sq += 1
            if close_sq > open_sq:
                return False
        elif c == "(":
            open_paren += 1
        elif c == ")":
            close_paren += 1
            if close_paren > open_paren:
                return False
        elif open_sq != close_sq:
            pass  # inside a bracket atom anything goes
        elif c.isdigit():
            ring_marks += 1
            after_percent = (pos >= 1 and s[pos - 1] == "%") or (pos >= 2 and s[pos - 2] == "%")
            if pos == 0 or (pos == 1 and s[0] != "%") or (pos > 1 and not after_percent):
                rings[c] = not rings.get(c, False)
        elif c == "%":
            if pos >= n - 2 or not s[pos + 1].isdigit() or not s[pos + 2].isdigit():
                return False
            ring_marks += 1
            label = s[pos + 1 : pos + 3]
            rings[label] = not rings.get(label, False)
            pos += 3
            continue
        elif s[pos : pos + 2] in _ALLOWED_TWO:
            pos += 2
            continue
        elif c not in _ALLOWED_ONE:
            return False
        pos += 1
    if open_sq != close_sq or any(rings.values()):
        return False
    if ring_marks < 2 and not _ASCII_UPPER.search(s):
        return False
    return _bracket_bodies_ok(s)


def _bracket_bodies_ok(s: str) -> bool:
    """Bracket bodies are checked in order until one starts with an element symbol."""
    for body in _BRACKET_BODIES.findall(s):
        if not body or "(" in body or ")" in body:
            return False
        if body[0] in _PERIODIC_TABLE or body[0] in _AROMATIC or body[:2] in _PERIODIC_TABLE:
            return True
    return True


def _smiles_runs(text: str) -> re.Pattern[str]:
    return _SMILES_RUN_WITH_BRACKETS if "[" in text else _SMILES_RUN


def _smiles_matches(text: str) -> Iterator[re.Match[str]]:
    """The candidate regex's matches that can pass the SMILES check. A candidate needs five ASCII
    letters, so a run with fewer (digits, dashes, ...) holds none."""
    for run in _smiles_runs(text).finditer(text):
        start, end = run.span()
        if not _SMILES_PASSABLE.search(text, start, end):
            continue
        if end - start <= 64:  # a typical molecule: the narrowing below would cost more than it saves
            yield from _SMILES_CANDIDATE.finditer(text, start, end)
            continue
        for items in _SMILES_ITEMS.finditer(text, start, end):
            if _FIVE_LETTERS.match(text, items.start(), items.end()):
                yield from _SMILES_CANDIDATE.finditer(text, items.start(), items.end())


def _smiles_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _smiles_matches(text):
        start, end = m.span()
        if not _is_smiles(m.group()):
            continue
        # A SMILES glued to a word ("xCCO...") is not one.
        if start > 0 and _is_ascii_letter(text[start - 1]):
            continue
        if end < len(text) and _is_ascii_letter(text[end]):
            continue
        yield start, end


def _protein_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _PROTEIN_CANDIDATE.finditer(text):
        if not _XNA_ONLY.fullmatch(m.group()):
            yield m.span()


def _xna_spans(text: str) -> Iterator[tuple[int, int]]:
    for m in _XNA_CANDIDATE.finditer(text):
        yield m.span()


def _wrap(parts: list[str], name: str, spans: Callable[[str], Iterator[tuple[int, int]]]) -> list[str]:
    begin, end = f"<{name}_AUTO_DETECT>", f"</{name}_AUTO_DETECT>"
    out: list[str] = []
    depth = 0
    for text in parts:
        if text in AUTO_BEGIN:
            depth += 1
            out.append(text)
        elif text in AUTO_END:
            depth = max(0, depth - 1)
            out.append(text)
        elif depth:
            out.append(text)
        else:
            pos = 0
            for start, stop in spans(text):
                if start > pos:
                    out.append(text[pos:start])
                out += (begin, text[start:stop], end)
                pos = stop
            if pos < len(text):
                out.append(text[pos:])
    return out


def split_auto_detected(text: str) -> list[str]:
    """Plain text -> pieces, detected spans wrapped in their `<..._AUTO_DETECT>` markers."""
    smiles = list(_smiles_spans(text))
    # Every nucleic-acid candidate is also a protein candidate, so one search rules out both later stages.
    if not smiles and not _PROTEIN_CANDIDATE.search(text):
        return [text]
    parts = _wrap([text], SMILES, lambda _: iter(smiles))
    parts = _wrap(parts, PROTEIN, _protein_spans)
    return _wrap(parts, XNA, _xna_spans)


def may_hold_span(chunk: str) -> bool:
    """False when no stage can find a span inside `chunk` wherever it stands in a longer text between
    spaces, provided no bracket atom ("[...]") of that text reaches out of `chunk`. Candidates hold no
    spaces outside bracket atoms, so a text whose chunks all answer False needs no detection."""
    return bool(_PROTEIN_CANDIDATE.search(chunk)) or any(True for _ in _smiles_matches(chunk))
