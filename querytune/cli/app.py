"""The typer application every command module adds its commands to, and the console they print on."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter- and memory-efficient transfer learning of Vision Transformers.")
console = Console()
