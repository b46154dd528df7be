"""Entry point: registers every command module and turns user errors into one line + exit 2."""

from __future__ import annotations

import sys

from deepalign.cli import core_cmds  # noqa: F401  (registers inspect, permute)
from deepalign.cli.common import app, err_console
from deepalign.errors import DeepAlignError


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a DeepAlignError prints ``error: ...`` on stderr and exits with status 2."""
    try:
        app(args=argv, prog_name="deepalign")
    except DeepAlignError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
