"""Reference graders: each on right, wrong and tricky answers; the code runner's limits (timeout, memory, no
network); the code grader on real MBPP and HumanEval rows; and the bundled table's own ground truths graded 1.0
against themselves, which shows the extraction rules match the data's formats."""

from __future__ import annotations

import ast
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from routers.offline.code_grader import CodeResult, code_tests, extract_code, prompt_code_tests, run_code_tests
from routers.offline.graders import (
    CODE_GRADER,
    GRADERS,
    METRIC_GRADERS,
    boxed_answer,
    choice_letter,
    concept_coverage,
    contains,
    exact_match,
    final_number,
    grader_for,
    normalise,
    normalised_match,
    regex_match,
    token_f1,
)

TABLE = Path(__file__).resolve().parents[2] / "data" / "llmrouter_9model" / "data.parquet"


@pytest.fixture(scope="module")
def table() -> Any:
    """The bundled llmrouter table, one row per distinct (prompt, ground truth)."""
    pd = pytest.importorskip("pandas")
    return pd.read_parquet(TABLE).drop_duplicates(["prompt", "ground_truth"])


def test_normalise_is_squad_style() -> None:
    assert normalise("  The Quick, brown-fox!  An apple\ta day. ") == "quick brownfox apple day"
    assert normalise("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words
    assert normalise("catch\u201122") == normalise("Catch-22") == "catch22"  # a non-breaking hyphen too


def test_exact_and_normalised_match() -> None:
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert normalised_match("The Beatles!", "beatles") == 1.0
    assert normalised_match("The Rolling Stones", "beatles") == 0.0


def test_contains_needs_whole_tokens() -> None:
    assert contains("I'm sure it was Sammy Davis Jr. who sang it.", "Sammy Davis, Jr") == 1.0
    assert contains("it was 112", "12") == 0.0
    assert contains("nothing at all", "no") == 0.0
    assert contains("anything", "") == 0.0  # an empty reference matches nothing


def test_token_f1_by_hand() -> None:
    # answer tokens [cat, sat, on, mat], reference [cat, sat, down]: 2 in common, P = 1/2, R = 2/3, F1 = 4/7.
    assert token_f1("The cat sat on the mat.", "a cat sat down") == pytest.approx(4 / 7)
    # Repeated tokens count as often as both sides hold them: x once, y once -> 2 / 3 each way.
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("Bayreuth, Germany", "bayreuth germany") == 1.0
    assert token_f1("Munich", "bayreuth germany") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty once articles go, as in the official script
    assert token_f1("the", "Paris") == 0.0


def test_token_f1_takes_the_best_json_alternative() -> None:
    assert token_f1("Paris", '["the city of light", "Paris, France"]') == pytest.approx(2 / 3)
    assert token_f1("[not json", "[not json") == 1.0  # a reference that only looks like a list is one answer


@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("I think the answer is (B), not A", "B", 1.0),
        ("I think the answer is (B), not A", "A", 0.0),
        ("A is tempting. Answer: C", "C", 1.0),
        ("**Answer:** D", "(D)", 1.0),
        ("It could be B.\nOn reflection, the correct answer is: **D**", "D", 1.0),  # the last statement wins
        ("At first the answer is A. On reflection, the answer is (C).", "C", 1.0),
        ("At first the answer is A. On reflection, the answer is (C).", "A", 0.0),
        ("The correct option is E.", "E", 1.0),
        ("The final answer is $\\boxed{\\text{(C)}}$", "C", 1.0),
        ("(C) Paris, because it is the capital.", "C", 1.0),
        ("C) Paris", "C", 1.0),
        ("B. The Moon", "B", 1.0),
        ("Let me think.\nB\n", "B", 1.0),
        ("(A) is wrong; (C) is right.", "A", 1.0),  # no statement: the first standalone letter
        ("A dog barks. I think so.", "A", 0.0),  # capitals in sentences are words, not choices
        ("the answer is c", "C", 0.0),  # letters must be capitals
        ("The answer is 3.", "3", 1.0),  # options numbered 1-4 (some ARC questions)
        ("The answer is 3.", "4", 0.0),
        ("I am not sure.", "B", 0.0),
    ],
)
def test_choice_letter(answer: str, reference: str, score: float) -> None:
    assert choice_letter(answer, reference) == score


@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("So she paid $1,234.50 in total.", "1000 + 234.5 = 1234.5\n#### 1234.5", 1.0),
        ("3 + 4 = 7, so #### 7.0", "#### 7", 1.0),
        ("The answer is \\boxed{18}, from 3 boxes.", "#### 18", 1.0),  # the box beats the last number
        ("It rose by 50%.", "#### 50", 1.0),
        ("The total is -5.", "#### -5", 1.0),
        ("Between 3-5 of them.", "#### -5", 0.0),  # a range's dash is no minus sign
        ("He had 20,000 dollars.", "He started with 20000 dollars.", 1.0),  # no "####": the last number
        ("The answer is 1234.51", "#### 1234.5", 0.0),
        ("2.00001", "#### 2", 0.0),
        ("2.0000001", "#### 2", 1.0),  # within 1e-6 relative
        ("I cannot tell.", "#### 4", 0.0),
    ],
)
def test_final_number(answer: str, reference: str, score: float) -> None:
    assert final_number(answer, reference) == score


@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$", "Hence the answer is $\\boxed{\\dfrac{1}{2}}$.", 1.0),
        ("\\boxed{\\frac12}", "\\boxed{\\tfrac{1}{2}}", 1.0),
        ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", 1.0),  # numbers compare numerically
        ("\\boxed{\\frac{2}{3}}", "\\boxed{\\frac{1}{2}}", 0.0),
        ("first \\boxed{3}, then \\fbox{\\left( 1, \\frac{\\pi}{2} \\right)}", "\\boxed{(1,\\frac{\\pi}{2})}", 1.0),
        ("\\boxed{90^\\circ}", "\\boxed{90}", 1.0),
        ("\\boxed{\\text{Sunday}}.", "\\boxed{\\text{Sunday}}", 1.0),
        ("\\boxed{10{,}000}", "\\boxed{10000}", 1.0),
        ("\\boxed{28}", "28", 1.0),  # a reference with no box is the answer itself
        ("The answer is 28.", "28", 0.0),  # an answer must box its result
        ("\\boxed{\\frac{1}{2", "\\boxed{\\frac{1}{2}}", 0.0),  # cut off
    ],
)
def test_boxed_answer(answer: str, reference: str, score: float) -> None:
    assert boxed_answer(answer, reference) == score


def test_concept_coverage_with_inflections() -> None:
    reference = "jog, dog, spin, hope, dance, fly, cat"
    answer = "Two dogs were jogging and spinning; she hoped they'd keep dancing while the bird flies."
    assert concept_coverage(answer, reference) == pytest.approx(6 / 7)  # every concept but "cat"
    assert concept_coverage("A catalogue of hot dogs.", "cat, dog") == 0.5  # "catalogue" is not "cat"
    assert concept_coverage("Nothing here.", "cat, dog") == 0.0
    assert concept_coverage("anything", "") == 0.0


def test_regex_match_ignores_the_reference() -> None:
    grade = regex_match(r"(?i)\bparis\b")
    assert grade("It is PARIS.", "unused") == 1.0
    assert grade("Comparison", "Paris") == 0.0
    with pytest.raises(ValueError, match=r"invalid grader pattern '\(unclosed'"):
        regex_match("(unclosed")


def test_grader_for_resolves_names_and_refuses_code_without_the_flag() -> None:
    assert set(GRADERS) == {"exact", "normalised", "contains", "token_f1", "choice", "number", "boxed", "coverage"}
    assert CODE_GRADER not in GRADERS
    assert grader_for("boxed") is boxed_answer
    assert grader_for("regex:^42$")("42", "") == 1.0
    with pytest.raises(ValueError, match="--allow-code"):
        grader_for(CODE_GRADER)
    assert grader_for(CODE_GRADER, allow_code=True) is code_tests
    with pytest.raises(ValueError, match=r"unknown grader 'bleu'; known graders: exact, normalised, .*, code, regex:"):
        grader_for("bleu")


def test_every_metric_of_the_bundled_table_has_a_grader(table: Any) -> None:
    assert set(table["metric"]) == set(METRIC_GRADERS)
    for name in METRIC_GRADERS.values():
        assert callable(grader_for(name, allow_code=True))


def _boxed_reference_answer(ground_truth: str) -> str:
    """What a model answering a MATH row should write: the worked solution itself when it boxes its result (the
    math task), else the bare number boxed (agentverse-mgsm)."""
    return ground_truth if "\\boxed" in ground_truth else f"So the total is $\\boxed{{{ground_truth}}}$."


SELF_ANSWERS: dict[str, Callable[[str], str]] = {
    "em_mc": lambda gt: f"Let me think it through.\nThe answer is ({gt}).",
    "GSM8K": lambda gt: gt,
    "MATH": _boxed_reference_answer,
    "f1_score": lambda gt: gt,
    "commongen_coverage": lambda gt: "A scene with " + " and ".join(gt.split(",")) + ".",
}


@pytest.mark.parametrize("metric", sorted(SELF_ANSWERS))
def test_ground_truths_score_one_against_themselves(table: Any, metric: str) -> None:
    rows = table[table["metric"] == metric]
    grade = grader_for(METRIC_GRADERS[metric])
    misses = [gt for gt in rows["ground_truth"] if grade(SELF_ANSWERS[metric](gt), gt) != 1.0]
    assert len(rows) > 100
    assert misses == []


def test_a_wrong_answer_scores_zero_on_the_bundled_table(table: Any) -> None:
    sample = table.groupby("metric").head(20)
    for metric, gt in zip(sample["metric"], sample["ground_truth"], strict=True):
        if metric == "em_mc":
            assert choice_letter("The answer is (J).", gt) == 0.0
        elif metric == "GSM8K":
            assert final_number("#### 123456789", gt) == 0.0


def test_extract_code_takes_the_last_defining_python_block() -> None:
    answer = (
        "First try:\n```python\ndef f(x):\n    return x\n```\nBetter:\n```python\ndef f(x):\n    return x + 1\n```\n"
        "Usage:\n```python\nprint(f(2))\n```\nRun it with:\n```bash\npython f.py\n```\nOutput:\n```\n3\n```"
    )
    assert extract_code(answer) == "def f(x):\n    return x + 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("def g():\n    return 2") == "def g():\n    return 2"  # no fence: the whole answer
    assert extract_code("Here:\n```python\ndef h():\n    return 3\n") == "def h():\n    return 3\n"  # unclosed


@pytest.mark.slow
def test_run_code_tests_passes_and_fails() -> None:
    assert run_code_tests("def f(x):\n    return 2 * x", "assert f(2) == 4") == CodeResult(True, "ok")
    result = run_code_tests("def f(x):\n    return 2 * x", "assert f(2) == 5")
    assert not result.passed
    assert result.detail == "failed: AssertionError"
    assert run_code_tests("def f(:", "").detail.startswith("failed: SyntaxError")
    # Leaving early must not count as passing the tests.
    assert not run_code_tests("import sys\nsys.exit(0)", "assert False").passed
    # An exit status of 0 is not enough: the tests must have run.
    skipped = run_code_tests("import os\nos._exit(0)", "assert False")
    assert not skipped.passed and "before the tests had run" in skipped.detail


@pytest.mark.slow
def test_run_code_tests_runs_in_a_fresh_directory_with_a_bare_environment() -> None:
    probe = "import os\nraise SystemError(repr((os.getcwd(), sorted(os.environ))))"
    result = run_code_tests(probe, "")
    cwd, env = ast.literal_eval(result.detail.removeprefix("failed: SystemError: "))
    assert Path(cwd).name.startswith("turnout-grade-")
    assert not Path(cwd).exists()  # removed afterwards
    assert "PATH" in env
    assert "HOME" not in env
    assert set(env) <= {"PATH", "LC_CTYPE"}  # LC_CTYPE: Python's own locale coercion in a C locale


@pytest.mark.slow
def test_run_code_tests_enforces_a_wall_clock_timeout() -> None:
    started = time.monotonic()
    result = run_code_tests("import time\nwhile True:\n    time.sleep(0.01)", "", timeout_s=1)
    assert result.detail == "timeout"
    assert not result.passed
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_run_code_tests_blocks_network_and_bounds_memory_and_files() -> None:
    connect = run_code_tests("import socket", "socket.create_connection(('127.0.0.1', 9))")
    assert not connect.passed
    assert "network access is disabled" in connect.detail
    raw = run_code_tests("import socket", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    assert "network access is disabled" in raw.detail
    hog = run_code_tests("block = bytearray(1024 ** 3)", "", memory_mb=256)
    assert hog.detail == "failed: MemoryError"
    big = run_code_tests("open('big', 'wb').write(b'x' * (11 * 1024 * 1024))", "")
    assert big.detail.startswith("failed: OSError") and "File too large" in big.detail
    assert run_code_tests("import asyncio", "asyncio.run(asyncio.sleep(0))").passed  # socketpair still works


def _row(table: Any, task: str, needle: str) -> tuple[str, str]:
    """(prompt, ground truth) of the one `task` row whose ground truth contains `needle`."""
    rows = table[(table["task"] == task) & table["ground_truth"].str.contains(needle, regex=False)]
    assert len(rows) == 1
    return str(rows["prompt"].iloc[0]), str(rows["ground_truth"].iloc[0])


@pytest.mark.slow
def test_code_tests_on_a_real_mbpp_row(table: Any) -> None:
    _, tests = _row(table, "mbpp", "max_of_three")
    right = "Here you go:\n```python\ndef max_of_three(a, b, c):\n    return max(a, b, c)\n```"
    wrong = "```python\ndef max_of_three(a, b, c):\n    return min(a, b, c)\n```"
    assert code_tests(right, tests) == 1.0
    assert code_tests(wrong, tests) == 0.0


@pytest.mark.slow
def test_code_tests_on_a_real_human_eval_row(table: Any) -> None:
    prompt, tests = _row(table, "human_eval", "candidate(123.456)")
    assert "def truncate_number(number: float) -> float:" in prompt
    right = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    wrong = "```python\ndef truncate_number(number: float) -> float:\n    return number - round(number)\n```"
    helper_first = "def _frac(x):\n    return x % 1.0\n\ndef truncate_number(number):\n    return _frac(number)\n"
    assert code_tests(right, tests) == 1.0
    assert code_tests(wrong, tests) == 0.0
    assert code_tests(helper_first, tests, entry_point="truncate_number") == 1.0
    assert code_tests("    return number % 1.0", tests) == 0.0  # a bare body: only the answer's code runs


@pytest.mark.slow
def test_a_humaneval_answer_completes_its_prompt(table: Any) -> None:
    """The prompt is code (imports, signature, docstring): an answer that is only the body passes, and so does a
    whole function that leans on the prompt's imports; a wrong body fails."""
    prompt, tests = _row(table, "human_eval", "candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3)")
    row = {"prompt": prompt, "ground_truth": tests}
    body = ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) "
            "for j, b in enumerate(numbers) if i != j)\n")
    assert prompt_code_tests(row["prompt"], body, row["ground_truth"]) == 1.0
    whole = ("def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + body)
    assert prompt_code_tests(row["prompt"], f"```python\n{whole}```", row["ground_truth"]) == 1.0
    assert prompt_code_tests(row["prompt"], "    return False\n", row["ground_truth"]) == 0.0

