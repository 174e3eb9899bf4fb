"""The `mtp-runtime` command line: the click group `main` (the console script) and its commands.

Each command lives in its own module (generate, bench, info, train, serve); `common` holds what they share.
"""

from __future__ import annotations

import click

from . import bench, generate, info, serve, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Speculative decoding with DeepSeek multi-token-prediction (MTP) modules."""


main.add_command(generate.generate)
main.add_command(bench.bench)
main.add_command(info.info)
main.add_command(train.train)
main.add_command(serve.serve)

__all__ = ["main"]
