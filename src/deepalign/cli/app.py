"""Entry point: registers every command module and turns user errors into one line + exit 2."""

from __future__ import annotations

import sys

import typer

import deepalign.cli.align_cmds  # noqa: F401  (registers align, merge, lmc, similarity)
import deepalign.cli.bench_cmds  # noqa: F401  (registers bench, demo)
import deepalign.cli.train_cmds  # noqa: F401  (registers train)
import deepalign.cli.zoo_cmds  # noqa: F401  (registers zoo, export)
from deepalign.cli import core_cmds  # noqa: F401  (registers inspect, permute)
from deepalign.cli.common import app, err_console
from deepalign.errors import DeepAlignError


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a DeepAlignError prints ``error: ...`` on stderr and exits with status 2."""
    try:
        code = app(args=argv, prog_name="deepalign", standalone_mode=False)
    except DeepAlignError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.TyperException as exc:  # usage errors: unknown option, missing argument, ...
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `deepalign`: the help, as before
            exc.show()
        else:
            msg = " ".join(exc.format_message().split())
            err_console.print(
                f"error: {msg} (see --help)", markup=False, highlight=False, soft_wrap=True
            )
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    if isinstance(code, int) and code:  # typer.Exit(code) from a command
        sys.exit(code)


if __name__ == "__main__":
    main()
