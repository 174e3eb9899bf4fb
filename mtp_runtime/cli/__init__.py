"""The `mtp-runtime` command line: the click group `main` (the console script) and its commands.

Each command lives in its own module (generate, bench, info, train, serve); `common` holds what they share. Every error
is one line on stderr: an MTPRuntimeError exits with 1 (see common.friendly_errors), a malformed command line
(an unknown option, a value click cannot parse) with 2, as click does; warnings of the `mtp_runtime` logger are one
line each too.
"""

from __future__ import annotations

import logging
import sys

import click

from . import bench, generate, info, serve, train


class _OneLineErrors(click.Group):
    """click's group, with usage errors printed as one 'error: ...' line instead of usage, hint and message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _WarningLines(logging.Handler):
    """The `mtp_runtime` logger's warnings as 'warning: ...' lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def _report_warnings() -> None:
    logger = logging.getLogger("mtp_runtime")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))
        logger.propagate = False


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mtp-runtime", prog_name="mtp-runtime")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Speculative decoding with DeepSeek multi-token-prediction (MTP) modules."""
    _report_warnings()


main.add_command(generate.generate)
main.add_command(bench.bench)
main.add_command(info.info)
main.add_command(train.train)
main.add_command(serve.serve)

__all__ = ["main"]
