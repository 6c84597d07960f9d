"""The code grader: a model's Python code run against a task's tests in a separate, limited process. Kept apart
from the other graders (`routers.offline.graders`) because it runs model output: `turnout grade` uses it only
with `--allow-code`."""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_NPROC = 128
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class CodeResult:
    """The outcome of running a program and its tests: `detail` is "ok", "timeout" or "failed: <why>"."""

    passed: bool
    detail: str


# The child's code: sockets off (wrapping an existing descriptor, as socketpair for asyncio does, opens nothing),
# then program and tests in a fresh module, not __main__, so `if __name__ == "__main__":` blocks stay quiet.
_DRIVER = r"""
import json, socket, sys, types
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        if kwargs.get("fileno") is None and len(args) < 4: raise OSError("network access is disabled while grading")
        super().__init__(*args, **kwargs)
socket.socket = _NoSocket
socket.create_connection = lambda *args, **kwargs: _NoSocket()
def _run():
    sources = json.loads(sys.stdin.read())
    token = sources.pop("token")
    sys.modules["__graded__"] = module = types.ModuleType("__graded__")
    for name in ("program", "tests"):
        try:
            exec(compile(sources[name], "<" + name + ">", "exec"), module.__dict__)
        except SystemExit:
            raise SystemExit("the graded code called exit() before its tests finished")
    sys.stdout.write("\n" + token)
    sys.stdout.flush()
_run()
"""


def _limit(kind: int, value: int) -> None:
    """Set a resource limit (soft = hard), never above the hard limit in force (only root may raise that)."""
    _, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def _child_limits(memory_mb: int, cpu_s: int) -> None:
    """The child's limits, set by `preexec_fn` between fork and exec."""
    _limit(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    _limit(resource.RLIMIT_CPU, cpu_s)
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_FSIZE, 10 * 1024 * 1024)
    if hasattr(resource, "RLIMIT_NPROC"):
        # Against fork bombs. RLIMIT_NPROC counts every process of the user, not of this child, so on a busy
        # account it may leave no room even for threads; and it is not enforced at all for root.
        _limit(resource.RLIMIT_NPROC, _NPROC)


def _failure(returncode: int, stderr: bytes) -> str:
    """The detail "failed: <last line of stderr>" (200 characters at most), or the status or signal if silent."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    if lines:
        return f"failed: {lines[-1][:200]}"
    if returncode < 0:
        return f"failed: killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    return f"failed: exit status {returncode}"


def run_code_tests(program: str, tests: str, *, timeout_s: float = 10.0, memory_mb: int = 512) -> CodeResult:
    """Run `program` then `tests` (Python source) in a separate process; passed iff it exits with status 0.

    The child is `sys.executable -I -S` (isolated: no PYTHON* variables, no site-packages, so the standard
    library only) in a fresh temporary directory removed afterwards, with only PATH in its environment, limits
    on memory, CPU time, open files, file size and processes, and sockets that refuse to open. A wall-clock
    timeout kills its whole process group. This is NOT a security boundary: the socket block and the limits are
    best effort, and Python code can get around them. Run graders on untrusted model output only on a machine
    you can afford to lose, or in a container.
    """
    # The driver prints this token once the tests have run: an exit status of 0 alone could be the program's own
    # (os._exit(0) before any test ran).
    token = secrets.token_hex(16)
    payload = json.dumps({"program": program, "tests": tests, "token": token}).encode()
    limits = functools.partial(_child_limits, memory_mb, math.ceil(timeout_s) + 1)
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    with (
        tempfile.TemporaryDirectory(prefix="turnout-grade-", ignore_cleanup_errors=True) as cwd,
        tempfile.TemporaryFile() as stderr,
        tempfile.TemporaryFile() as stdout,
    ):
        # Output goes to files, where RLIMIT_FSIZE caps it: a chatty loop cannot fill memory.
        with subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _DRIVER], stdin=subprocess.PIPE, stdout=stdout,
            stderr=stderr, cwd=cwd, env=env, start_new_session=True, preexec_fn=limits,
        ) as proc:  # fmt: skip
            try:
                proc.communicate(payload, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return CodeResult(False, "timeout")
            finally:
                # The whole group, whatever the outcome, so that children the program left behind die too.
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stdout.seek(max(0, stdout.seek(0, os.SEEK_END) - len(token)))
        if proc.returncode == 0 and stdout.read().decode("ascii", "replace") == token:
            return CodeResult(True, "ok")
        if proc.returncode == 0:
            return CodeResult(False, "failed: the process ended before the tests had run")
        stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4096))
        return CodeResult(False, _failure(proc.returncode, stderr.read()))


def _statements(code: str) -> list[ast.stmt] | None:
    """The top-level statements of `code`, or None when it is not valid Python."""
    try:
        return ast.parse(code).body
    except (SyntaxError, ValueError):
        return None


def extract_code(answer: str) -> str:
    """The Python code of a model answer: the last ```python (or bare ```) fenced block that defines a function
    or class, else the last such block that is valid Python with a statement other than a bare expression (an
    example-usage or output block is passed over), else the whole answer. An unclosed fence runs to the end."""
    blocks = [m.group(2) for m in _FENCE.finditer(answer) if m.group(1).lower() in ("", "python", "py", "python3")]
    parsed = [(block, _statements(block)) for block in reversed(blocks)]
    for block, body in parsed:
        if body and any(isinstance(s, (*_FUNCTIONS, ast.ClassDef)) for s in body):
            return block
    for block, body in parsed:
        if body and not all(isinstance(s, ast.Expr) for s in body):
            return block
    return answer


def code_tests(answer: str, reference: str, *, entry_point: str | None = None, timeout_s: float = 10.0) -> float:
    """1.0 iff the answer's code (`extract_code`) passes the reference's tests in `run_code_tests`, else 0.0.

    The reference is MBPP-style (a Python list literal of assert strings, or plain assert lines) or
    HumanEval-style test source defining `def check(candidate)`, then called as check(<entry_point>); the entry
    point defaults to the first top-level function of the extracted code. Only the answer's code and the tests
    run: an answer holding only a function body, or leaving out the prompt's imports, fails unless the caller
    adds the prompt's code to the answer first.
    """
    program = extract_code(answer)
    if re.search(r"^def check\(", reference, re.MULTILINE):
        functions = [s.name for s in _statements(program) or [] if isinstance(s, _FUNCTIONS)]
        entry_point = entry_point or next(iter(functions), None)
        if entry_point is None:
            return 0.0
        tests = f"{reference}\n\ncheck({entry_point})\n"
    else:
        tests = reference
        with suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            parsed = ast.literal_eval(reference.strip())
            if isinstance(parsed, list | tuple) and all(isinstance(p, str) for p in parsed):
                tests = "\n".join(parsed)
    return float(run_code_tests(program, tests, timeout_s=timeout_s).passed)


def prompt_code_tests(prompt: str, answer: str, reference: str) -> float:
    """`code_tests` for a prompt that is itself code (HumanEval: imports, the function's signature and its
    docstring): the answer runs with the prompt's imports, and an answer that is only the function's body
    completes the prompt; the tests call the prompt's last function. A prompt in prose (MBPP) is plain
    `code_tests`."""
    statements = _statements(prompt)
    functions = [s.name for s in statements or [] if isinstance(s, _FUNCTIONS)]
    if not functions:
        return code_tests(answer, reference)
    code = extract_code(answer)
    defined = {s.name for s in _statements(code) or [] if isinstance(s, _FUNCTIONS)}
    imports = [ast.get_source_segment(prompt, s) or "" for s in statements or []
               if isinstance(s, ast.Import | ast.ImportFrom)]
    program = "\n".join([*imports, code]) if functions[-1] in defined else prompt.rstrip() + "\n" + code
    return code_tests(f"```python\n{program}\n```", reference, entry_point=functions[-1])
