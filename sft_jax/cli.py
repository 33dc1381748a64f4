"""What every ``python -m sft_jax.NAME`` command shares: argument parsing, user errors, paths.

- ``parse``: options and ``key=value`` overrides in any order (``parse_intermixed_args``), so
  ``train train.steps=10 --config demo model.preset=tiny`` works.
- ``user_error``: a user mistake is one line on stderr and exit status 2 (``USER_ERROR_EXIT``);
  argparse's own usage errors exit 2 too.
- ``resolve_path``: relative and ``~`` paths become absolute before they reach orbax (which
  refuses relative paths); hub names and ``gs://`` URLs pass through unchanged.
- ``load_config``: the typed config with the "no --config" rule (see ``NEEDS_CONFIG``).
- ``training_command``: the one body of ``train``, ``reward``, ``dpo`` and ``ppo``; each names
  its objective and default config.
- ``parse(..., config_help=True)``: a command that reads the config names its sections in
  ``--help`` and takes ``--help-config [SECTION]`` (``add_config_help``).
"""

from __future__ import annotations

import argparse
import os
import sys

USER_ERROR_EXIT = 2

# Overrides that mean "this is a real run": without --config they would inherit the demo's
# settings (lr 3e-3, data.format demo, max_length 128, ...), so they require a --config.
NEEDS_CONFIG = ("model.init_from", "data.train", "data.eval")


def parse(parser: argparse.ArgumentParser, argv=None, *, config_help: bool = False) -> argparse.Namespace:
    """``parser.parse_intermixed_args``: positionals (overrides) on both sides of options.
    argparse cannot intermix with subcommands (``convert``); those parse as usual.
    ``config_help``: the command reads the config (see ``add_config_help``)."""
    if config_help:
        add_config_help(parser)
    if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        return parser.parse_args(argv)
    args = parser.parse_intermixed_args(argv)
    if config_help and args.help_config is not None:
        sys.exit(print_config_help(args.help_config))
    return args


def add_config_help(parser: argparse.ArgumentParser) -> None:
    """``--help-config [SECTION]``, and a ``--help`` epilog that names the config sections and
    the reference page. Reads no config (and imports no jax) until ``--help-config`` is given."""
    from sft_jax import configref

    parser.add_argument("--help-config", nargs="?", const="", default=None, metavar="SECTION",
                        help="print every config key (or those of SECTION) with its type, default and meaning, "
                             "and exit")
    parser.epilog = configref.epilog()
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = _UnbrokenOptionsFormatter


class _UnbrokenOptionsFormatter(argparse.HelpFormatter):
    """argparse's wrapping, without breaking a line inside ``--help-config``."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def print_config_help(section: str) -> int:
    """Print the keys of ``section`` ("" = all, or a dotted key); an unknown one is a user error."""
    from sft_jax import configref

    try:
        print(configref.text(section))
    except KeyError:
        return user_error(f"unknown config section {section!r}; sections: {', '.join(configref.section_names())}")
    return 0


def user_error(message) -> int:
    """Print ``error: message`` as one line on stderr; returns the exit status for ``main``."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's mistake (config, data, model files, checkpoints)."""
    from sft_jax.core.checkpoint import CheckpointError
    from sft_jax.config import ConfigError
    from sft_jax.data import DataError
    from sft_jax.models.hf_io import HFFormatError

    return ConfigError, DataError, HFFormatError, CheckpointError


def run_training(start) -> int:
    """The exit status of a training command: ``start()`` loads the config and runs the core
    (returning its ``RunResult``). A user mistake is one line and 2; too many non-finite steps
    in a row, 1; a preempted run says how to resume and exits 0."""
    from sft_jax.core.loop import NonFiniteError

    try:
        result = start()
    except user_errors() as e:
        return user_error(e)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.status == "preempted":
        print(f"preempted at step {result.step}; rerun the same command to resume", file=sys.stderr)
    return 0


def resolve_path(path: str, *, must_be_local: bool = False) -> str:
    """An absolute local path for anything that looks like or exists as a local path.

    ``gs://...`` stays as is; a bare name that does not exist locally (``gpt2``,
    ``openai-community/gpt2``) stays a hub name unless ``must_be_local`` (an output path).
    """
    from sft_jax.runtime.paths import is_remote

    path = os.fspath(path)
    if is_remote(path):
        return path
    expanded = os.path.expanduser(path)
    looks_local = must_be_local or os.path.exists(expanded) or path.startswith(("~", ".", os.sep))
    return os.path.abspath(expanded) if looks_local else path


def load_config(config_path, overrides):
    """``sft_jax.config.load_config`` with the CLI rule: with no ``--config``, overrides apply to
    the demo unless one sets ``model.init_from``, ``data.train`` or ``data.eval``; that is a
    ConfigError (a real run must start from a shipped config or the user's own YAML)."""
    from sft_jax.config import ConfigError
    from sft_jax.config import load_config as load

    if config_path is None:
        given = [key for key in (o.partition("=")[0].strip() for o in overrides) if key in NEEDS_CONFIG]
        if given:
            raise ConfigError(f"{'/'.join(given)} given without --config; start from a shipped config "
                              f"(--config gpt2_alpaca) or your own YAML")
    return load(config_path, overrides)


def training_command(argv, *, prog: str, doc: str, objective: str, default_config: str | None,
                     example: str = "train.steps=100", prepare=None, finish=None) -> int:
    """Parse ``[--config FILE] [key=value ...]``, load the config and run the training core with
    ``objective`` ("module:Class" under ``sft_jax.objectives``). ``default_config`` None means
    the SFT demo with the ``NEEDS_CONFIG`` rule. ``prepare(config)`` runs after the config is
    loaded and before training, and may return a config to run instead (the RL demo trains its
    SFT start there when it is absent, and gives GRPO its own run directory);
    ``finish(config, result)`` after a run that is done (the RL demo prints its figures)."""
    import importlib

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--config", default=default_config,
                        help=f"YAML file or packaged config name (default: {default_config or 'demo'})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    args = parse(parser, argv, config_help=True)

    def start():
        from sft_jax.core import loop

        module, name = objective.split(":")
        objective_cls = getattr(importlib.import_module(f"sft_jax.objectives.{module}"), name)
        config = load_config(args.config, args.overrides)
        if prepare is not None:
            config = prepare(config) or config
        result = loop.run(config, objective_cls)
        if finish is not None and result.status == "done":
            finish(config, result)
        return result

    return run_training(start)
