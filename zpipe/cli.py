"""The `zpipe` command: parses arguments and calls the core, nothing more."""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .config import MAX_SECONDS, apply_environment, load
from .errors import ConfigError

# Each command imports the core it calls when it runs: `zpipe stage`, which
# `zpipe launch` starts once per replica, then loads neither the supervisor
# nor the launcher, and every replica starts sooner.

EXIT_BAD_INPUT = 2


def _fail(exc: Exception, status: int = EXIT_BAD_INPUT) -> NoReturn:
    click.echo(f"zpipe: error: {exc}", err=True)
    _exit(status)


def _exit(status: int) -> NoReturn:
    """Exit with ``status``, even when a stage module imported for the check left a thread.

    `validate` and `launch` import every stage's module in this process. One
    that started a non-daemon thread on import (or whose import was cut short
    while it ran one) would keep the interpreter from exiting for ever; then
    leave at once instead, after flushing what was printed.
    """
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not lingering:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _seconds_option(ctx: click.Context, param: click.Parameter, value: float | None
                    ) -> float | None:
    # FloatRange lets nan and inf through (nan fails every comparison).
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise click.BadParameter(f"must be a number of seconds > 0 and at most "
                                 f"{MAX_SECONDS:g} (got {value})")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zpipe")
def main() -> None:
    """Multi-stage pipelines over ZeroMQ: each stage replica its own process."""


def _view_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """What `launch` and `supervise` show and serve while the pipeline runs (views.py)."""
    for option in reversed([
        click.option("--live/--no-live", default=None,
                     help="The live view (default: when stderr is a terminal)."),
        click.option("-q", "--quiet", is_flag=True,
                     help="Print only errors, the stages' own lines and the summary."),
        click.option("--status-interval", type=click.FloatRange(0, MAX_SECONDS), default=10.0,
                     show_default=True,
                     help="Seconds between status lines when stderr is not a terminal "
                          "(0: none)."),
        click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
                     help="Also write the summary's figures to this file, as JSON."),
        click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                     help="Serve Prometheus metrics at /metrics on this port."),
        click.option("--metrics-address", default="127.0.0.1", show_default=True,
                     help="The address the metrics port is bound to."),
        click.option("--health-port", type=click.IntRange(0, 65535), default=None,
                     help="Answer /livez and /readyz on this port."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                     show_default=True, help="json: one JSON object a line."),
    ]):
        command = option(command)
    return command


def _views(options: dict[str, Any]) -> Any:
    from .watch.views import ViewOptions
    return ViewOptions(**options)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--grace", type=float, default=None, callback=_seconds_option,
              help="Seconds to let items in flight drain after Ctrl-C or SIGTERM "
                   "(default: [pipeline] grace, else 5).")
@_view_options
def launch(file: str, grace: float | None, **view: Any) -> None:
    """Run the pipeline described in FILE (a pipeline.toml) on this host."""
    from .supervision import launcher
    # What is imported by now lives until the exit: left out of every collection,
    # the exit's too (10 ms instead of 25-65 ms here). The stages' modules,
    # imported later by the check, are collected as usual.
    gc.collect()
    gc.freeze()
    try:
        outcome = launcher.launch(file, grace=grace, view=_views(view))
    except ConfigError as exc:
        _fail(exc)
    _exit(outcome.exit_code)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check FILE, its imports and params without running anything; print the plan."""
    from .config import placeholder_runtime_dir
    from .supervision import launcher
    try:
        spec = load(file)
        callees = launcher.check(spec)
        # As long as the folder launch will make, so that both see the same ipc paths.
        plan = launcher.describe_plan(spec, callees, placeholder_runtime_dir(spec.name))
    except ConfigError as exc:
        _fail(exc)
    click.echo(plan)
    click.echo("ok")
    _exit(0)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("name")
@click.option("--replica", type=click.IntRange(min=0), default=0, show_default=True,
              envvar="ZPIPE_REPLICA",
              help="Which replica of the stage this process is (or $ZPIPE_REPLICA: a "
                   "Kubernetes pod's index, see `zpipe export k8s`).")
@click.option("--health-port", type=click.IntRange(0, 65535), default=None,
              help="Answer /livez and /readyz on this port (for a container engine's probes).")
def stage(file: str, name: str, replica: int, health_port: int | None) -> None:
    """Run one replica of stage NAME of FILE (what `launch` starts for each replica)."""
    from .replica import worker
    try:
        status = worker.run_stage_process(apply_environment(load(file), os.environ), name,
                                          replica, health_port)
    except ConfigError as exc:
        _fail(exc)
    sys.exit(status)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--grace", type=float, default=None, callback=_seconds_option,
              help="Seconds to let items in flight drain after Ctrl-C or SIGTERM.")
@_view_options
def supervise(file: str, grace: float | None, **view: Any) -> None:
    """Run only the supervisor of FILE, for replicas started elsewhere (containers, hosts).

    Every replica runs as `zpipe stage FILE NAME --replica I`; addresses are the
    file's tcp ones, or ZPIPE_CONTROL and ZPIPE_ADDRESS_<STAGE> from the environment.
    """
    from .supervision import launcher
    try:
        outcome = launcher.supervise(file, grace=grace, view=_views(view))
    except ConfigError as exc:
        _fail(exc)
    sys.exit(outcome.exit_code)


def _status_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--keys", type=click.Path(file_okay=False), default=None,
                           help="The CurveZMQ keys folder, when the pipeline has one.")(command)
    command = click.option("--control", default=None,
                           help="The supervisor's control address (tcp://HOST:PORT) instead "
                                "of a NAME.")(command)
    return click.argument("name", required=False)(command)


@main.command()
@_status_options
def status(name: str | None, control: str | None, keys: str | None) -> None:
    """Print what a running pipeline is doing: NAME on this host, or --control anywhere."""
    from .watch import status as statuses
    try:
        for address in statuses.addresses(name, control):
            click.echo(statuses.show(statuses.query(address, keys)), nl=False)
    except statuses.StatusError as exc:
        _fail(exc, 1)
    except ConfigError as exc:  # a --keys folder without the pipeline's keys
        _fail(exc)
    _exit(0)


@main.command()
@_status_options
def top(name: str | None, control: str | None, keys: str | None) -> None:
    """Show a running pipeline live until it ends (Ctrl-C to leave)."""
    from rich.console import Console

    from .watch import status as statuses
    try:
        address = statuses.addresses(name, control)[0]
        statuses.top(address, keys, Console(),
                     say=lambda line: click.echo(f"zpipe: {line}", err=True))
    except statuses.StatusError as exc:
        _fail(exc, 1)
    except ConfigError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass
    _exit(0)


@main.command()
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--ready", is_flag=True, help="Ask /readyz rather than /livez.")
def probe(port: int, ready: bool) -> None:
    """Ask this host's health PORT (`zpipe stage/supervise --health-port`): exit 0 if it
    answers 200, 1 otherwise (a container healthcheck)."""
    from .watch.health import probe as ask
    status, text = ask(port, "/readyz" if ready else "/livez")
    click.echo(text.rstrip(), err=status != 200)
    _exit(0 if status == 200 else 1)


@main.group()
def export() -> None:
    """Write deployment files for a pipeline."""


def _context_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--context", type=click.Path(file_okay=False), default=".",
                        show_default=True,
                        help="The folder the image is built from: FILE's path inside the "
                             "image is its path from there.")(command)


def _output_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("-o", "--output", type=click.File("w"), default="-",
                        show_default=True, help=f"Where to write {what}.")


@export.command("compose")
@click.argument("file", type=click.Path(dir_okay=False))
@_output_option("docker-compose.yml")
@click.option("--image", default=None, help="Image every service runs (default: zpipe-NAME).")
@_context_option
def export_compose(file: str, output: Any, image: str | None, context: str) -> None:
    """A docker-compose.yml running each replica of FILE as its own service."""
    from .deploy.compose import compose
    spec = _load_for_export(file)
    _write(output, lambda: compose(spec, file, _image(spec, image), context))


@export.command("k8s")
@click.argument("file", type=click.Path(dir_okay=False))
@_output_option("the manifests")
@click.option("--image", default=None, help="Image every pod runs (default: zpipe-NAME).")
@click.option("-n", "--namespace", default=None,
              help="Put every object in this namespace (default: kubectl's).")
@_context_option
def export_k8s(file: str, output: Any, image: str | None, namespace: str | None,
               context: str) -> None:
    """Kubernetes manifests: a ConfigMap, and per stage a headless Service plus an
    Indexed Job ([pipeline] service = true: a StatefulSet)."""
    from .deploy.kubernetes import kubernetes
    spec = _load_for_export(file)
    _write(output, lambda: kubernetes(spec, file, _image(spec, image), context, namespace))


@export.command("dockerfile")
@click.argument("file", type=click.Path(dir_okay=False))
@_output_option("the Dockerfile")
@_context_option
def export_dockerfile(file: str, output: Any, context: str) -> None:
    """A Dockerfile for FILE's folder of stages (and its requirements.txt) on the zpipe image."""
    from .deploy.dockerfile import dockerfile
    spec = _load_for_export(file)
    _write(output, lambda: dockerfile(spec, file, context))


def _load_for_export(file: str) -> Any:
    try:
        return load(file)
    except ConfigError as exc:
        _fail(exc)


def _image(spec: Any, image: str | None) -> str:
    return image or f"zpipe-{spec.name.lower()}:latest"


def _write(output: Any, render: Callable[[], str]) -> None:
    # Rendered whole before anything is written: a refused export leaves no half file.
    try:
        text = render()
    except ConfigError as exc:
        _fail(exc)
    output.write(text)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
def keys(folder: str) -> None:
    """Make the CurveZMQ key pairs a pipeline's `keys = "FOLDER"` names."""
    from .wire import security
    for path in security.create_keys(folder):
        click.echo(str(path))


@main.command("dead-letters")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--show", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also print the first N items of each stage, with their exception.")
def dead_letters(folder: str, show: int) -> None:
    """List the dead letters in FOLDER: per stage, how many, of which exception types."""
    from .replica import deadletters
    if not os.path.isdir(folder):
        _fail(ConfigError(f"{folder}: no such folder of dead letters"))
    try:
        lines, warnings = deadletters.summary(folder, show)
    except OSError as exc:
        _fail(ConfigError(f"{folder}: cannot read: {exc.strerror or exc}"))
    for line in lines or [f"no dead letters in {folder}"]:
        click.echo(line)
    for warning in warnings:
        click.echo(f"zpipe: warning: {warning}", err=True)
    _exit(0)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("stage_name", metavar="STAGE")
@click.argument("file", type=click.Path(dir_okay=False))
def replay(folder: str, stage_name: str, file: str) -> None:
    """Run the dead letters of STAGE (in FOLDER) through FILE's pipeline from STAGE on.

    Items that fail again are dead-lettered anew; exit status as for launch.
    """
    from .supervision.replay import replay as run_replay
    try:
        status = run_replay(folder, stage_name, file)
    except ConfigError as exc:
        _fail(exc)
    _exit(status)
