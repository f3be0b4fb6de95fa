"""Sinks chosen by URL scheme. The daemon never imports a backend module directly."""

from __future__ import annotations

import importlib

from runrelay.sinks.base import BlobSource, Sink

# scheme -> "module:Class"; imported on first use so a missing driver only
# matters to those who configure that backend.
_BACKENDS = {
    "sqlite": "runrelay.sinks.sql:SqlSink",
    "postgresql": "runrelay.sinks.sql:SqlSink",
    "postgresql+psycopg": "runrelay.sinks.sql:SqlSink",
    "mysql": "runrelay.sinks.sql:SqlSink",
    "mysql+pymysql": "runrelay.sinks.sql:SqlSink",
    "mariadb+pymysql": "runrelay.sinks.sql:SqlSink",
}


class UnknownSinkError(ValueError):
    """No backend serves this URL."""


def schemes() -> list[str]:
    return sorted(_BACKENDS)


def sink_for(url: str, blobs: BlobSource) -> Sink:
    """Build (but do not open) the sink for ``url``."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _BACKENDS:
        raise UnknownSinkError(
            f"no sink for {url.split('://')[0]!r} URLs; known schemes: {', '.join(schemes())}"
        )
    module_name, _, class_name = _BACKENDS[scheme.lower()].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownSinkError(
            f"the {scheme} sink needs a driver that is not installed ({error.name}); "
            f"install runrelay with the matching extra"
        ) from error
    return getattr(module, class_name)(url, blobs)
