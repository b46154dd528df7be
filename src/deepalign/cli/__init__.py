"""Command-line interface (no logic of its own: it parses, calls the library, prints)."""

from __future__ import annotations

from pathlib import Path


def inspect_dir(path: Path, as_json: bool) -> None:
    """`inspect` on a folder: a zoo or an aligner, described by the module that owns it."""
    from deepalign.errors import DeepAlignError

    if (path / "manifest.json").is_file():
        from deepalign.cli.zoo_cmds import describe_zoo

        describe_zoo(path, as_json)
    elif (path / "config.json").is_file():
        from deepalign.cli.train_cmds import describe_aligner

        describe_aligner(path, as_json)
    else:
        raise DeepAlignError(
            f"{path}: a folder, but neither a zoo (manifest.json) nor an aligner (config.json)"
        )
