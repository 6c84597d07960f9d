"""Reference graders: a model's answer -> a quality score in [0, 1] against a reference, for building routing
tables from a user's own fleet (`turnout grade`). Every grader is `(answer, reference) -> float`, never NaN; the
code grader (`routers.offline.code_grader`) is kept apart (`CODE_GRADER`, `grader_for(..., allow_code=True)`)
because it runs model output."""

from __future__ import annotations

import functools
import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

from routers.offline.code_grader import code_tests

GraderFn = Callable[[str, str], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_NUMBER = re.compile(r"(?<![\w.])-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|(?<![\w.])-?\.\d+%?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LATEX_DROPS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^{\\circ}", "^\\circ", "\\$", "$", "{,}", "\\%")
_DOUBLED = frozenset("bcdfgklmnprstvz")  # the final consonants English doubles before -ing/-ed (not w, x, y)
_SHORTHAND = re.compile(r"(\\frac\{[^{}]*\}|\\frac|\\sqrt)(\d)")
# Numbers are equal within a 1e-6 relative tolerance (and a tiny absolute one, for zero).
_close = functools.partial(math.isclose, rel_tol=1e-6, abs_tol=1e-9)


def normalise(text: str) -> str:
    """SQuAD-style normal form: lower-cased, punctuation removed, articles (a, an, the) removed, whitespace
    collapsed. Unicode punctuation (e.g. a non-breaking hyphen) is removed as well as ASCII."""
    kept = "".join(c for c in text.lower() if c not in _ASCII_PUNCTUATION and unicodedata.category(c)[0] != "P")
    return " ".join(_ARTICLES.sub(" ", kept).split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 iff the answer equals the reference, ignoring surrounding whitespace."""
    return float(answer.strip() == reference.strip())


def normalised_match(answer: str, reference: str) -> float:
    """1.0 iff the answer equals the reference after `normalise`."""
    return float(normalise(answer) == normalise(reference))


def contains(answer: str, reference: str) -> float:
    """1.0 iff the normalised reference (non-empty) occurs in the normalised answer as whole tokens, so that
    reference "12" is not found in "112" nor "no" in "nothing"."""
    ref = normalise(reference)
    return float(bool(ref) and f" {ref} " in f" {normalise(answer)} ")


def _f1(answer_tokens: list[str], reference_tokens: list[str]) -> float:
    """SQuAD token F1: 2PR/(P+R) = 2 * common / (len(answer) + len(reference)); with no tokens on a side, 1.0
    only if both sides are empty, as the official script does."""
    if not answer_tokens or not reference_tokens:
        return float(answer_tokens == reference_tokens)
    common = sum((Counter(answer_tokens) & Counter(reference_tokens)).values())
    return 2 * common / (len(answer_tokens) + len(reference_tokens))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD token F1 over `normalise`d tokens. A reference that is a JSON list of strings holds several
    acceptable answers, and the best F1 counts."""
    alternatives = [reference]
    if reference.lstrip().startswith("["):
        with suppress(ValueError):
            parsed = json.loads(reference)
            if isinstance(parsed, list) and parsed and all(isinstance(p, str) for p in parsed):
                alternatives = parsed
    tokens = normalise(answer).split()
    return max(_f1(tokens, normalise(alt).split()) for alt in alternatives)


def _choice_patterns(labels: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(explicit statement, standalone label) patterns for one label class such as "A-J" or "1-9"."""
    explicit = re.compile(
        r"(?i:\b(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be))?\s*(?:[:=]|(?<=is)|(?<=be))\s*"
        rf"(?:\*\*\s*)?(?:option\s+|choice\s+)?)[(\[]?\s*([{labels}])\s*[)\]]?(?!\w)"
        rf"|\\boxed\{{\s*(?:\\text\{{)?\s*\(?([{labels}])\)?\s*\}}?\s*\}}"
    )
    # Fallback forms only: "(C)", "[C]", "C)", "C.", "C:" or a line holding just the label (bold allowed). A bare
    # capital inside a sentence is no choice: "A" and "I" are ordinary words.
    standalone = rf"[(\[]([{labels}])[)\]]|(?<![\w(\[])([{labels}])[).:](?!\w)|^[\s*]*([{labels}])[\s*]*$"
    return explicit, re.compile(standalone, re.MULTILINE)


_LETTER_PATTERNS = _choice_patterns("A-J")
_DIGIT_PATTERNS = _choice_patterns("1-9")


def _chosen(text: str, patterns: tuple[re.Pattern[str], re.Pattern[str]]) -> str | None:
    """The option label `text` chooses: its last explicit statement, else its first standalone label."""
    explicit, standalone = patterns
    statements = list(explicit.finditer(text))
    found = statements[-1] if statements else standalone.search(text)
    return None if found is None else next(g for g in found.groups() if g)


def choice_letter(answer: str, reference: str) -> float:
    """Multiple choice: 1.0 iff the option letter (A-J, capitals) the answer chooses is the reference's ("C",
    "(C)", "Answer: C"...). The answer's choice is its last explicit statement ("the answer is (C)", "Answer: C",
    "\\boxed{C}"), else its first standalone letter ("(C)", "C)", "C.", a line holding only the letter). A digit
    reference (some ARC questions number their options 1-4) is matched the same way with digits."""
    ref = reference.strip()
    patterns = _DIGIT_PATTERNS if ref.strip("()[]. ").isdigit() else _LETTER_PATTERNS
    wanted, got = _chosen(ref, patterns), _chosen(answer, patterns)
    return float(wanted is not None and got == wanted)


def _number(text: str, *, last: bool) -> float | None:
    """The first or last number in `text`, with thousands commas, "$" and "%" removed."""
    found = _NUMBER.findall(text)
    return float(re.sub(r"[\s$,%]", "", found[-1 if last else 0])) if found else None


def final_number(answer: str, reference: str) -> float:
    """GSM8K-style: 1.0 iff the answer's final number equals the reference's, compared as numbers.

    The reference's number is the first after its last "####" if it has one, else its last number. The answer's
    is the first after "####" if present, else the last number inside its last \\boxed{}, else its last number.
    """
    ref = _number(reference.rsplit("####", 1)[-1], last="####" not in reference)
    marked, boxed = "####" in answer, _last_boxed(answer)
    got = _number(answer.rsplit("####", 1)[-1] if marked else answer if boxed is None else boxed, last=not marked)
    return float(ref is not None and got is not None and _close(got, ref))


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} (balanced braces), or of "\\boxed 5"; None if there is
    none or it is cut off (a truncated answer has no final answer, even if it boxed an earlier step)."""
    start = max(_BOXED.finditer(text), key=lambda found: found.start(), default=None)
    if start is None:
        return None
    if start.group(1) is None:  # "\boxed 5": up to the next space or "$"
        bare = re.match(r"[^\s$]+", text[start.end() :])
        return bare.group() if bare else None
    depth = 1
    for i in range(start.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start.end() : i]
    return None


def _latex_normal(text: str) -> str:
    """A light LaTeX normal form: no spaces, \\left/\\right, spacing commands, degrees, dollars, percent signs,
    \\text{} wrappers or trailing full stop; \\dfrac and \\tfrac written \\frac, \\frac12 as \\frac{1}{2}."""
    out = _TEXT_WRAPPER.sub(r"\1", text)
    for drop in _LATEX_DROPS:
        out = out.replace(drop, "")
    out = re.sub(r"\\[dt]frac", r"\\frac", "".join(out.split()))
    # Braces for shorthand arguments (\frac12, \frac1{72}, \sqrt3); two passes for the two of \frac12.
    return _SHORTHAND.sub(r"\1{\2}", _SHORTHAND.sub(r"\1{\2}", out)).rstrip(".")


def _latex_number(text: str) -> float | None:
    """The value of a normalised answer that is a plain number or an integer fraction \\frac{a}{b}."""
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|-?\.\d+", text):
        return float(text.replace(",", ""))
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text)
    sign = -1 if frac and frac.group(1) else 1
    return sign * int(frac.group(2)) / int(frac.group(3)) if frac and int(frac.group(3)) != 0 else None


def boxed_answer(answer: str, reference: str) -> float:
    """MATH-style: 1.0 iff the answer's last \\boxed{} equals the reference's last \\boxed{} (the whole
    reference when it has none) after a light LaTeX normalisation; numbers and integer fractions compare
    numerically. An answer without \\boxed{} scores 0.0."""
    got, ref = _last_boxed(answer), _last_boxed(reference)
    if got is None:
        return 0.0
    got, ref = _latex_normal(got), _latex_normal(reference if ref is None else ref)
    got_value, ref_value = _latex_number(got), _latex_number(ref)
    return float(got == ref or (got_value is not None and ref_value is not None and _close(got_value, ref_value)))


def _forms(word: str) -> set[str]:
    """The word and its simple inflections: +s, +es, +d, +ed, +ing, e dropped before -ing, a final consonant
    doubled before -ing/-ed (jog -> jogging) and y -> ies/ied (fly -> flies)."""
    forms = {word, word + "s", word + "es", word + "d", word + "ed", word + "ing"}
    if word.endswith("e"):
        forms.add(word[:-1] + "ing")
    if len(word) >= 3 and word[-1] in _DOUBLED and word[-2] in "aeiou" and word[-3] not in "aeiou":
        forms.update({word + word[-1] + "ing", word + word[-1] + "ed"})
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        forms.update({word[:-1] + "ies", word[:-1] + "ied"})
    return forms


def concept_coverage(answer: str, reference: str) -> float:
    """CommonGen: the fraction of the reference's comma-separated concepts whose word, or a simple inflection
    of it, appears as a token of the lower-cased answer. A multi-word concept needs each of its words."""
    concepts = [c.strip().lower() for c in reference.split(",") if c.strip()]
    tokens = set(re.findall(r"[a-z0-9]+", answer.lower()))
    covered = sum(all(_forms(w) & tokens for w in c.split()) for c in concepts)
    return covered / len(concepts) if concepts else 0.0


def regex_match(pattern: str) -> GraderFn:
    """A grader scoring 1.0 iff `pattern` is found (re.search) in the answer; the reference is ignored."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid grader pattern {pattern!r}: {err}") from err

    def grade(answer: str, reference: str) -> float:
        """1.0 iff the pattern is found in the answer."""
        return float(compiled.search(answer) is not None)

    return grade


#: Graders by name, for the `turnout grade --grader NAME` command. Code is absent here on purpose (it runs
#: model output): see CODE_GRADER.
GRADERS: dict[str, GraderFn] = {
    "exact": exact_match, "normalised": normalised_match, "contains": contains, "token_f1": token_f1,
    "choice": choice_letter, "number": final_number, "boxed": boxed_answer, "coverage": concept_coverage,
}  # fmt: skip
CODE_GRADER = "code"

#: The grader for each `metric` value of the bundled llmrouter table (column `metric`).
METRIC_GRADERS: dict[str, str] = {
    "em_mc": "choice", "GSM8K": "number", "MATH": "boxed", "f1_score": "token_f1",
    "commongen_coverage": "coverage", "code_eval": CODE_GRADER,
}  # fmt: skip


def grader_for(name: str, *, allow_code: bool = False) -> GraderFn:
    """The grader called `name`: a key of GRADERS, "regex:<pattern>", or "code" (only with `allow_code`)."""
    if name.startswith("regex:"):
        return regex_match(name.removeprefix("regex:"))
    if name == CODE_GRADER:
        if not allow_code:
            raise ValueError(
                "the 'code' grader runs model-written programs on this machine, and its sandbox is best effort, not "
                "a security boundary; pass --allow-code to accept that (ideally inside a container you can discard)"
            )
        return code_tests
    if name not in GRADERS:
        known = ", ".join([*GRADERS, CODE_GRADER, "regex:<pattern>"])
        raise ValueError(f"unknown grader {name!r}; known graders: {known}")
    return GRADERS[name]
