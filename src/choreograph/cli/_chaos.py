"""``choreograph chaos APP``: the chaos harness (``bench/chaos.py``) of a source checkout.

    choreograph chaos examples.shop.app:app --orders 500 --kill-every 2 --json

runs ``python bench/chaos.py --orders 500 --kill-every 2 --json``: every option after
APP is the harness's (``python bench/chaos.py --help`` lists them). Without APP the options
come first (``choreograph chaos --orders 500``) and the shop runs. A chaos run is only
as good as its invariants, and those are a scenario's own (money and stock for the
shop), so the command knows the apps that have a scenario rather than guessing checks
for any app; the harness lives in ``bench/``, beside the examples, not in the package.
"""

from __future__ import annotations

import typer

from choreograph.cli._common import load_module
from choreograph.errors import ConfigurationError

DEFAULT_APP = "examples.shop.app:app"
SCENARIOS = {DEFAULT_APP: "bench.chaos"}
"""App -> the module of its chaos harness (a ``main(argv) -> exit status``)."""


def chaos(
    ctx: typer.Context,
    target: str = typer.Argument(
        DEFAULT_APP, metavar="MODULE:APP", help="MODULE:ATTR of an App with a chaos scenario"
    ),
) -> None:
    """Run N orders through an App while injecting faults, hangs, kills and duplicates; check its invariants.

    Options after APP go to the harness: see `python bench/chaos.py --help`. Without APP
    (`choreograph chaos --orders 50`) the shop runs.
    """
    harness_args = list(ctx.args)
    if target.startswith("-"):
        # Unknown options are passed through, so with APP left out the first of them lands
        # here: an option, never a MODULE:ATTR. It is the harness's, and the app the default.
        target, harness_args = DEFAULT_APP, [target, *harness_args]
    module_name = SCENARIOS.get(target)
    if module_name is None:
        raise ConfigurationError(f"choreograph chaos: no chaos scenario for {target!r}; known: {sorted(SCENARIOS)}")
    try:
        harness = load_module(module_name)
    except ConfigurationError as exc:
        if exc.__cause__ is not None:  # the harness is there but its import failed: say why, not "not found"
            raise ConfigurationError(
                f"choreograph chaos: the harness {module_name.replace('.', '/')}.py failed to import: {exc} "
                "(it runs in a source checkout's dev environment: make setup)"
            ) from exc
        raise ConfigurationError(
            f"choreograph chaos: {module_name.replace('.', '/')}.py not found; run it from a source checkout"
        ) from None
    code = harness.main(harness_args)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("chaos", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(chaos)
