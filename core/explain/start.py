"""Whether the daemon explains, and what starts its Explainer: psycopg, the optional
extra's, is imported only when `[explain]` asks for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pgslowlog.errors import UserError

if TYPE_CHECKING:
    from pgslowlog.config import Config
    from pgslowlog.dispatcher import Dispatcher
    from pgslowlog.explain.explainer import Explainer


def explainer_for(config: Config) -> Callable[[Dispatcher], Explainer] | None:
    """With [explain]: what starts the Explainer, which goes between the collectors and
    the dispatcher. psycopg is the optional extra's: imported only then, and its absence
    refused in one line before anything starts."""
    explain, redact = config.explain, config.daemon.redact_literals
    if not config.explaining or explain is None:
        return None
    try:
        from pgslowlog.explain.explainer import Explainer
    except ImportError:
        raise UserError(
            "[explain] is set but psycopg is missing",
            "pip install 'pgslowlog[explain]', or remove the [explain] table",
        ) from None
    return lambda dispatcher: Explainer(explain, dispatcher, redact).start()
