"""The ``querytune`` command line: train | eval | predict | export | serve | cache | bench | measure | info | methods.

One module per group of commands (:mod:`.train`, :mod:`.serving`, :mod:`.cache`, :mod:`.bench`, :mod:`.about`);
the flags of the run, runtime, training and bench settings are generated from their dataclasses
(:mod:`.flags`), ``--config`` files are read by :mod:`.configfile`, tables printed by :mod:`.printing`.

Every user error (missing folder, bad split, unknown method or option, mismatched
checkpoint) is printed as one line on stderr and exits with code 2.

``torchrun --nproc-per-node N -m querytune train|eval|cache ...`` runs the command
data-parallel over N processes (see :mod:`querytune.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from .. import distributed
from ..errors import QuerytuneError
from . import about, bench, cache, serving, train  # noqa: F401  (each adds its commands to the app)
from .app import app
from .flags import method_options_help


def build_cli() -> typer.Typer:
    """The command line, with the method list and options of ``train`` taken from the registry as it is now."""
    from ..methods import METHODS

    for command in app.registered_commands:
        if command.callback is train.train:
            command.epilog = method_options_help()
            command.help = (train.train.__doc__ or "") + f"\n\nMethods: {', '.join(sorted(METHODS))}."
    return app


def main(argv: list[str] | None = None) -> None:
    """The command line; ``argv`` defaults to ``sys.argv[1:]``."""
    try:
        build_cli()(args=argv, standalone_mode=False)
    except QuerytuneError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        usage: Any = error  # click's UsageError (typer bundles click, so it is not importable by that name)
        if type(usage).__name__ == "NoArgsIsHelpError":  # a bare `querytune`: the help
            usage.show()
        else:  # a value typer cannot convert, an unknown flag: one line, as every user error
            see = f" (see {usage.ctx.command_path} --help)" if getattr(usage, "ctx", None) is not None else ""
            print(f"error: {' '.join(usage.format_message().split())}{see}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.shutdown()
