"""The ``cpjump1`` command line: the single entry point of every stage, for pods and local runs.

Stage commands are loaded lazily from their modules so that ``cpjump1 catalog`` does not
import pycytominer or Great Expectations. Each stage module exposes a click command named
``command`` (or the attribute named below).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from cpjump1.errors import Cpjump1Error

#: command name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "catalog": "cpjump1.catalog:command",
    "synthesize": "cpjump1.synthetic:command",
    "load-data": "cpjump1.load_data:command",
    "validate": "cpjump1.validation:command",
    "illum": "cpjump1.cellprofiler:illum_command",
    "analysis": "cpjump1.cellprofiler:analysis_command",
    "aggregate": "cpjump1.aggregate:command",
    "profiles": "cpjump1.profiles:command",
    "deep-profiles": "cpjump1.deepprofiler:command",
    "benchmark": "cpjump1.benchmark:command",
}


def _available(target: str) -> bool:
    module = target.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, target in COMMANDS.items() if _available(target))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or not _available(target):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (pytest swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):  # the base class assigns it; we always follow sys.stderr
        pass


def configure_logging(level: str = "INFO") -> None:
    """Readable one-line logs (they end up in Airflow task logs and pod logs)."""
    handler = _CurrentStderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    )
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="INFO", show_default=True, help="Logging level.")
@click.version_option(package_name="cpjump1")
def cli(log_level: str) -> None:
    """CPJUMP1 Cell Painting profiling: one command per pipeline stage."""
    configure_logging(log_level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input exits 2 with a one-line message naming what is wrong."""
    try:
        cli.main(args=argv, prog_name="cpjump1", standalone_mode=False)
    except Cpjump1Error as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
