"""Which certainty measure applies to a message: multiple choice (the uncertainty head scores the option letters)
or free text (Kernel Language Entropy over sampled answers). ``detect_mcq`` decides; ``mcq_options`` gives the
option texts it found.

The rule, exactly. A message is multiple choice when it holds a *run* of at least two option markers lettered
consecutively from A (A, B, C, ... in that order, nothing else of the same style in between), all of one style and
one case (``A) B)`` or ``a) b)``, never mixed), and every option in the run has text with a letter or digit in it.
The styles:

- ``A)``, ``(A)`` and ``[A]`` may stand anywhere, on separate lines or inline, but only after whitespace or at the
  start of the text ("f(x)" and "3(a)" are no markers). The run's first marker must open a line (after optional
  spaces and a "-", "*" or "+" bullet) or follow the start of the text or one of ``? : . ! ;`` or a dash (spaces
  between allowed): options are laid out after a question or a label, not mentioned mid-sentence ("I think a) is
  wrong because b) ..." is no question);
- ``A.`` and ``A:`` count only at the start of a line (same optional indentation and bullet) and followed by a
  space or tab: inline they are initials, grades and labels ("A. B. Smith", "Grade A. Then B.", "Plan A: ...").

Any marker may be wrapped in Markdown bold (``**A)**``). An option's text runs from its marker to the next marker
of the run; the last option's text runs to the end of its line.

Numbered options ("1) 4  2) 7") are deliberately not multiple choice: numbered lines are far more often steps or
lists than options, nothing in the layout tells the two apart, and the uncertainty head scores option *letters*.
Known blind spots (see ``results/certainty/mcq_detector.md``): dialogues written "A: ... / B: ...", outlines and
lettered sub-questions ("(a) Define ... (b) Give ...") on their own lines read as options; options after a dash
("A - x"), inline "A. x B. y" and "A.)" are not recognised.
"""

from __future__ import annotations

import re

_BOLD = r"(?:\*\*|__)?"
_LINE_START = r"^[ \t]*(?:[-*+][ \t]+)?"  # indentation and an optional Markdown bullet
# Style name -> marker pattern; group "letter" is the option letter.
_STYLES: dict[str, re.Pattern[str]] = {
    "X)": re.compile(rf"(?<!\S){_BOLD}(?P<letter>[A-Za-z])\){_BOLD}"),
    "(X)": re.compile(rf"(?<!\S){_BOLD}\((?P<letter>[A-Za-z])\){_BOLD}"),
    "[X]": re.compile(rf"(?<!\S){_BOLD}\[(?P<letter>[A-Za-z])\]{_BOLD}"),
    "X.": re.compile(rf"{_LINE_START}{_BOLD}(?P<letter>[A-Za-z])\.{_BOLD}(?=[ \t])", re.MULTILINE),
    "X:": re.compile(rf"{_LINE_START}{_BOLD}(?P<letter>[A-Za-z]):{_BOLD}(?=[ \t])", re.MULTILINE),
}
_LINE_ONLY = {"X.", "X:"}
# What may come before the first inline marker of a run: start of text, a line start (with optional bullet),
# or sentence punctuation / a dash, each with optional spaces.
_OPENS = re.compile(r"(?:^|\n)[ \t]*(?:[-*+][ \t]+)?$|[?:.!;\-–—][ \t]*$")
_HAS_WORD = re.compile(r"\w")


def _opens(text: str, start: int) -> bool:
    return _OPENS.search(text, 0, start) is not None or not text[:start].strip()


def _option_texts(text: str, run: list[re.Match[str]]) -> list[str] | None:
    """The texts of a run's options, or None when one of them is empty."""
    options = []
    for k, m in enumerate(run):
        if k + 1 < len(run):
            end = run[k + 1].start()
        else:
            newline = text.find("\n", m.end())
            end = len(text) if newline < 0 else newline
        option = text[m.end() : end].strip().rstrip(",;").strip()
        if not _HAS_WORD.search(option):
            return None
        options.append(option)
    return options


def _runs(text: str, style: str, pattern: re.Pattern[str]) -> list[tuple[int, list[str]]]:
    """(start, option texts) of every qualifying run of one style, both cases."""
    found = []
    for upper in (True, False):
        run: list[re.Match[str]] = []
        matches = [m for m in pattern.finditer(text) if m.group("letter").isupper() == upper]
        for m in [*matches, None]:  # None flushes the last run
            index = None if m is None else ord(m.group("letter").upper()) - ord("A")
            if m is not None and run and index == len(run):
                run.append(m)
                continue
            if len(run) >= 2 and (options := _option_texts(text, run)) is not None:
                found.append((run[0].start(), options))
            # a marker that breaks a run may start the next one, if it is an A in an opening position
            opening = m is not None and index == 0 and (style in _LINE_ONLY or _opens(text, m.start()))
            run = [m] if opening else []
    return found


def mcq_options(text: str) -> list[str] | None:
    """The option texts of the first run of options in ``text`` (see the module docstring), or None when the text
    lays out no options."""
    runs = [run for style, pattern in _STYLES.items() for run in _runs(text, style, pattern)]
    return min(runs)[1] if runs else None


def detect_mcq(text: str) -> bool:
    """True when ``text`` lays out lettered answer options (the rule is the module docstring's)."""
    return mcq_options(text) is not None
