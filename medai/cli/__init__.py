"""The `medai` command: one module per command group, each thin (parse, call a pipeline function, print).

Exit codes, for every command: 0 done; 1 done, but some items failed (each named with its reason);
2 bad input or usage (a missing file, a bad config or option), nothing done.
"""

from __future__ import annotations

import logging

import typer
from typer.core import TyperGroup

from medai.cli import data, demo, dicom, doctor, ehr, mil, models, pacs, seg, slides, train, vlm
from medai.errors import MedaiError

EXIT_CODES = "Exit codes: 0 done; 1 done with failed items (each named); 2 bad input or usage, nothing done."


class MedaiGroup(TyperGroup):
    """The root command group: medai's own errors (bad config, missing data, unreadable input) exit 2, in one line."""

    def invoke(self, ctx: typer.Context) -> object:
        """Run the command; a MedaiError that reaches here means nothing was done: print it, exit 2."""
        try:
            return super().invoke(ctx)
        except MedaiError as exc:
            # The message already names the file and what is wrong; a traceback would only bury it.
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(help=f"medai: medical multimodal AI pipeline.\n\n{EXIT_CODES}", no_args_is_help=True,
                  add_completion=False, cls=MedaiGroup)
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
app.command("finetune")(train.finetune)
app.command("evaluate")(train.evaluate)
for _group in (data, models, ehr, dicom, pacs, slides, seg, vlm, mil):
    app.add_typer(_group.app, name=_group.__name__.rsplit(".", 1)[1])


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console entry point (`medai`): the app, whose root group turns medai's own errors into exit code 2."""
    app()
