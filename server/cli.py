"""The `turnout` command: run the gateway and check configs."""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
import uvicorn
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from server.app import CONFIG_ENV, create_app
from server.config import ConfigError, KeyConfig, load_config
from server.connections import guarded_protocol, raise_open_file_limit
from server.quota.keystore import add_key, list_keys, revoke_key
from server.snapshot import check_config_file
from server.store.base import StoreUnavailable
from server.store.redis_store import RedisStore

T = TypeVar("T")
EMBEDDER_HELP = ("static (default: MiniLM's word-piece vectors, fast on CPUs; the gateway's default too), onnx "
                 "(MiniLM itself), st:<model path> or openai:<model>@<base url> (a remote /v1/embeddings server)")


class LogLevel(enum.StrEnum):
    """Log levels `serve` accepts."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


app = typer.Typer(help="Turnout: a multi-LLM query-routing gateway.", no_args_is_help=True)
# soft_wrap: never break a problem line in two (logs and CI read this output too).
err = Console(stderr=True, soft_wrap=True, emoji=False)  # messages quote user text: no :emoji: codes


def _print_problems(source: Path, exc: ConfigError) -> None:
    err.print(f"[red]{escape(str(source))}: {len(exc.problems)} problem(s)[/red]")
    for p in exc.problems:
        err.print(f"  - {p}", highlight=False, markup=False)


@app.command("check-config")
def check_config(file: Annotated[Path, typer.Argument(help="YAML config to validate")]) -> None:
    """Validate a config file and its policies' artifacts; list every problem and exit 1 if there are any."""
    try:
        cfg = check_config_file(file)
    except ConfigError as exc:
        _print_problems(file, exc)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: ok ({len(cfg.workers)} workers, {len(cfg.policies)} policies, "
               f"default policy: {cfg.default_policy or 'none'})")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help=f"YAML config (default: ${CONFIG_ENV})")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8080,
    log_level: Annotated[LogLevel, typer.Option(help="Log level")] = LogLevel.info,
    access_log: Annotated[bool, typer.Option(help="uvicorn's access log (the request log is separate)")] = False,
) -> None:
    """Run the gateway."""
    path = config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if path is None:
        err.print(f"[red]no config: pass --config FILE or set {CONFIG_ENV}[/red]")
        raise typer.Exit(2)
    try:
        cfg = check_config_file(path)  # fail fast, before binding the port
    except ConfigError as exc:
        _print_problems(path, exc)
        raise typer.Exit(1) from None
    logging.basicConfig(level=log_level.value.upper(), format="%(message)s")
    # httpx logs every upstream request at INFO; the request log already has one line per request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app_ = create_app(cfg, config_path=path, handle_sighup=True, freeze_heap=True)
    # SIGTERM: uvicorn stops accepting connections, lets requests and streams in flight finish for up to
    # the drain timeout, then closes them (the config at start decides it; a reload cannot change it).
    # Slow and huge clients are limited by the protocol class (`server.connections`); the gateway serves no
    # WebSockets, so none are accepted.
    protocol = guarded_protocol(cfg.server, raise_open_file_limit())
    uvicorn.run(app_, host=host, port=port, log_level=log_level.value, access_log=access_log,
                timeout_graceful_shutdown=math.ceil(cfg.server.drain_timeout_s),
                timeout_keep_alive=cfg.server.keep_alive_s, http=protocol, ws="none")


def _need_training_stack() -> None:
    """`train`, `eval` and `collect` need the `turnout[train]` extra, which a gateway install (its image) leaves
    out: say so instead of failing with an import traceback."""
    missing = [m for m in ("sklearn", "pandas", "pyarrow", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        hint = escape("pip install 'turnout[train]'")
        err.print(f"[red]turnout train and eval need the training packages ({', '.join(missing)} missing): "
                  f"{hint}[/red]", markup=True, highlight=False)
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option(help="Routing table (parquet, jsonl or csv)")],
    router: Annotated[str, typer.Option(help="knn, cost_aware or bandit")],
    out: Annotated[Path, typer.Option(help="Artifact directory to write")],
    embedder: Annotated[str, typer.Option(help=EMBEDDER_HELP)] = "static",
) -> None:
    """Train a router on a table's training rows and write a versioned artifact."""
    _need_training_stack()
    from routers.embedding.remote import EmbedderUnavailable
    from routers.offline.commands import run_train
    from routers.offline.prices import TableError

    try:
        run_train(data, router, out, embedder, Console(width=None if Console().is_terminal else 150))
    except (TableError, ValueError, EmbedderUnavailable) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option(help="Routing table (parquet, jsonl or csv)")],
    router: Annotated[list[str] | None, typer.Option(help="Routers to evaluate (repeat)")] = None,
    split: Annotated[str, typer.Option(help="Evaluation split when the table has one")] = "test",
    folds: Annotated[int, typer.Option(help="Cross-validation folds when it has none")] = 5,
    group_level: Annotated[int | None, typer.Option(
        help="Evaluate each task group on its own (1: mmlu/x -> mmlu)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the cost-quality plot here (PNG)")] = None,
    online: Annotated[bool, typer.Option(help="Also replay the table through the bandit (regret)")] = False,
    embedder: Annotated[str, typer.Option(help=EMBEDDER_HELP)] = "static",
    seed: Annotated[int, typer.Option(help="Seed of splits and replays")] = 0,
) -> None:
    """Train each router on the training rows and report every routing metric on the evaluation rows."""
    _need_training_stack()
    from routers.embedding.remote import EmbedderUnavailable
    from routers.offline.commands import run_eval
    from routers.offline.prices import TableError
    from routers.offline.report import EvalOptions

    try:
        run_eval(data, router or ["knn", "cost_aware", "bandit"],
                 EvalOptions(split=split, folds=folds, seed=seed, group_level=group_level), embedder,
                 json_out, plot, online, Console(width=None if Console().is_terminal else 150))
    except (TableError, ValueError, EmbedderUnavailable) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.command("collect")
def collect_cmd(
    config: Annotated[Path, typer.Option(help="The gateway's YAML config: its workers are the fleet")],
    prompts: Annotated[str, typer.Option(help="A .jsonl/.csv/.parquet file, log:REQUEST_LOG or bundled:llmrouter")],
    out: Annotated[Path, typer.Option(help="Run directory (a rerun resumes it)")],
    models: Annotated[str | None, typer.Option(help="Models or workers, comma-separated (default: all)")] = None,
    sample: Annotated[int | None, typer.Option(help="Collect on this many prompts, chosen at random")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Most answer tokens per call")] = 256,
    max_cost_usd: Annotated[float | None, typer.Option(help="Spend at most this much (the run's total)")] = None,
    concurrency: Annotated[int, typer.Option(help="Calls in flight at once")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of every call")] = 0.0,
    partial: Annotated[bool, typer.Option(help="With a cap below the estimate, collect what it buys")] = False,
    tasks: Annotated[str | None, typer.Option(help="Only prompts of these tasks, comma-separated")] = None,
) -> None:
    """Send every prompt to every chosen model of the config and record the answers, resumably."""
    _need_training_stack()
    from server.fleet.collect import CollectError
    from server.fleet.commands import CollectOptions, collect, summary
    from server.fleet.run import RunDir
    from server.fleet.sources import SourceError

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _print_problems(config, exc)
        raise typer.Exit(1) from None
    opts = CollectOptions(prompts, out, [m.strip() for m in models.split(",") if m.strip()] if models else None,
                          sample, seed, max_tokens, max_cost_usd, max(1, concurrency), temperature, partial,
                          [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None)
    console = Console(width=None if Console().is_terminal else 150)
    try:
        tally = asyncio.run(collect(cfg, opts, console))
    except (CollectError, SourceError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(summary(RunDir(out)))
    if tally.stopped_by_cap:
        console.print(f"stopped at --max-cost-usd {max_cost_usd}: the next call might have passed it")
    if tally.interrupted:
        console.print("interrupted: rerun the same command to collect the rest")
        raise typer.Exit(130)


@app.command("grade")
def grade_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory of `turnout collect`")],
    grader: Annotated[str, typer.Option(help="auto (each prompt's own), a grader name, regex:PATTERN, or judge")]
    = "auto",
    allow_code: Annotated[bool, typer.Option(help="Run model-written code against the tests (see the docs' risk)")]
    = False,
    config: Annotated[Path | None, typer.Option(help="The config whose model judges (with --grader judge)")] = None,
    judge: Annotated[str | None, typer.Option(help="The model that judges (with --grader judge)")] = None,
    pairwise_against: Annotated[str | None, typer.Option(help="Judge each answer against this model's")] = None,
    rubric: Annotated[Path | None, typer.Option(help="The judge's rubric prompt (a text file)")] = None,
    retries: Annotated[int, typer.Option(help="Ask the judge again this many times when its verdict is unreadable")]
    = 2,
    out: Annotated[Path | None, typer.Option(help="Table to write (default RUN_DIR/table.parquet)")] = None,
    keep_split: Annotated[bool, typer.Option(help="Keep the source's train/test split (else train and eval split "
                                                  "the table themselves)")] = True,
) -> None:
    """Score a run's answers into a routing table that `turnout train` and `turnout eval` read."""
    _need_training_stack()
    from server.fleet.commands import GradeOptions, run_grade

    opts = GradeOptions(run_dir, grader, allow_code, config, judge, pairwise_against, rubric, out, keep_split,
                        max(0, retries))
    console = Console(width=None if Console().is_terminal else 150)
    try:
        asyncio.run(run_grade(opts, console))
    except (ConfigError, ValueError, OSError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.command("replay")
def replay_cmd(
    config: Annotated[Path, typer.Option(help="A config holding the candidate policy (its artifact)")],
    policy: Annotated[str, typer.Option(help="The candidate policy's name in that config")],
    log: Annotated[Path, typer.Option(help="The gateway's request log (server.log_prompts on)")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here")] = None,
) -> None:
    """What a candidate policy would have decided on logged traffic, against what was served (no model calls)."""
    from routers.embedding.remote import EmbedderUnavailable
    from server.fleet.commands import replay_table
    from server.fleet.replay import replay
    from server.fleet.sources import SourceError
    from server.policy.embedding import build_embedder

    try:
        cfg = load_config(config)
        report = replay(cfg, config, policy, log, build_embedder(cfg.embedder))
    except (ConfigError, SourceError, EmbedderUnavailable) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None
    Console(width=None if Console().is_terminal else 150).print(replay_table(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_json(), indent=2) + "\n")


@app.command("feedback-table")
def feedback_table_cmd(
    log: Annotated[Path, typer.Option(help="The gateway's request log (server.log_prompts on)")],
    out: Annotated[Path, typer.Option(help="Routing table to write (parquet)")],
) -> None:
    """A routing table from served requests joined to the scores clients sent through /v1/feedback."""
    _need_training_stack()
    from server.fleet.feedback_table import feedback_table
    from server.fleet.sources import SourceError

    try:
        report = feedback_table(log, out)
    except (SourceError, OSError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None
    print(f"wrote {out}: {report.rows} scored requests {report.per_model}; {report.unmatched} feedback lines had "
          "no logged request with a prompt")


@app.command("promote")
def promote_cmd(
    config: Annotated[Path, typer.Option(help="The running gateway's config file")],
    artifact: Annotated[Path, typer.Option(help="A directory written by `turnout train`")],
    name: Annotated[str, typer.Option(help="The new policy's name")],
    lambda_: Annotated[float | None, typer.Option("--lambda", help="Quality-cost trade-off (knn, cost_aware)")]
    = None,
    map_: Annotated[list[str] | None, typer.Option("--map", help="ARTIFACT_MODEL=WORKER_OR_MODEL (repeat)")] = None,
    shadow_of: Annotated[str | None, typer.Option(help="Run it as this live policy's decision-only shadow")] = None,
    default: Annotated[bool, typer.Option(help="Make it the default policy")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the new config here (else print the policy block)")]
    = None,
) -> None:
    """A trained policy's config block, or a checked copy of the config that shadows or serves it."""
    from server.fleet.promote import policy_block, promoted_config

    overrides = dict(m.split("=", 1) for m in map_ or [] if "=" in m)
    try:
        block = policy_block(load_config(config), artifact.resolve(), name, overrides, lambda_)
        if out is None:
            print(yaml.safe_dump({"policies": {name: block}}, sort_keys=False), end="")
            return
        out.write_text(promoted_config(config, block, name, shadow_of=shadow_of, make_default=default,
                                       out_dir=out.resolve().parent))
    except ConfigError as exc:
        _print_problems(config, exc)
        raise typer.Exit(1) from None
    except (OSError, ValueError) as exc:
        err.print(f"[red]{escape(str(exc))}[/red]", markup=True, highlight=False)
        raise typer.Exit(1) from None
    print(f"wrote {out}: policy {name}" + (f" as the shadow of {shadow_of}" if shadow_of else "")
          + (", the default policy" if default else "") + "; swap it in and reload (POST /admin/reload or SIGHUP)")


keys_app = typer.Typer(help="Client keys kept in Redis (state.backend: redis). With the memory store, use the "
                             "gateway's /admin/keys endpoints instead.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
UrlEnv = Annotated[str, typer.Option("--url-env", help="environment variable holding the Redis URL")]


def _with_store(url_env: str, work: Callable[[RedisStore], Awaitable[T]]) -> T:
    url = os.environ.get(url_env)
    if not url:
        err.print(f"[red]{url_env} is not set: it must hold the Redis URL the gateways use[/red]")
        raise typer.Exit(2)

    async def run() -> T:
        store = RedisStore(url, timeout_s=5.0)
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="a name for the key (used in metrics and logs)")],
    policy: Annotated[list[str] | None, typer.Option(help="allowed policy (repeat; none = all)")] = None,
    model: Annotated[list[str] | None, typer.Option(help="allowed worker or model (repeat; none = all)")] = None,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="USD per budget period")] = None,
    period: Annotated[str, typer.Option(help="hour, day or month")] = "day",
    url_env: UrlEnv = "TURNOUT_REDIS_URL",
) -> None:
    """Create a key and print it (shown only this once; only its SHA-256 is stored)."""
    try:
        rules = KeyConfig.model_validate({
            "name": name, "key_sha256": "0" * 64, "policies": policy or [], "models": model or [],
            "requests_per_minute": rpm, "tokens_per_minute": tpm, "budget_usd": budget_usd, "budget_period": period})
    except ValidationError as exc:
        for e in exc.errors(include_url=False):
            err.print(f"  - {'.'.join(str(p) for p in e['loc']) or 'key'}: {e['msg']}", markup=False)
        raise typer.Exit(2) from None
    try:
        key = _with_store(url_env, lambda s: add_key(s, rules))
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    print(key)


@keys_app.command("list")
def keys_list(url_env: UrlEnv = "TURNOUT_REDIS_URL") -> None:
    """The stored keys' names and rules (never the keys)."""
    for k in _with_store(url_env, list_keys):
        print(json.dumps(k.model_dump(exclude={"key_sha256", "key_env"})))


@keys_app.command("revoke")
def keys_revoke(name: str, url_env: UrlEnv = "TURNOUT_REDIS_URL") -> None:
    """Revoke a stored key (every replica refuses it within a few seconds)."""
    if not _with_store(url_env, lambda s: revoke_key(s, name)):
        err.print(f"[red]no stored key named {name!r}[/red]")
        raise typer.Exit(1)
    print(f"revoked {name}")


def main() -> None:
    """Console-script entry point."""
    app()
