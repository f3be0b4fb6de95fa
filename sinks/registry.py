"""Sinks chosen by URL scheme. The daemon never imports a backend module directly."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from runrelay.sinks.base import RunSource, Sink, SinkConfigError

# scheme -> "module:Class"; imported on first use, and a backend's module imports its driver
# only when it connects, so a missing driver matters only to those who configure it.
_BACKENDS = {
    "sqlite": "runrelay.sinks.sql:SqlSink",
    "postgresql": "runrelay.sinks.sql:SqlSink",
    "postgresql+psycopg": "runrelay.sinks.sql:SqlSink",
    "mysql": "runrelay.sinks.sql:SqlSink",
    "mysql+pymysql": "runrelay.sinks.sql:SqlSink",
    "mariadb+pymysql": "runrelay.sinks.sql:SqlSink",
    "mongodb": "runrelay.sinks.mongo:MongoSink",
    "mongodb+srv": "runrelay.sinks.mongo:MongoSink",
    "file": "runrelay.sinks.filestorage_local:DirectorySink",
    "s3": "runrelay.sinks.filestorage_s3:S3Sink",
    "gs": "runrelay.sinks.filestorage_gcs:GcsSink",
    "observer": "runrelay.sinks.observer:ObserverSink",  # observer://module:Class
}


def schemes() -> list[str]:
    return sorted(_BACKENDS)


def backend(url: str) -> type[Sink]:
    """The sink class for ``url``'s scheme; SinkConfigError if none serves it."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _BACKENDS:
        raise SinkConfigError(f"no sink for {scheme or url!r} URLs; known schemes: {', '.join(schemes())}")
    module_name, _, class_name = _BACKENDS[scheme.lower()].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def sink_for(name: str, url: str, options: Mapping[str, Any], source: RunSource) -> Sink:
    """Build (but do not open) the sink ``name`` for a URL and options config has checked."""
    return backend(url)(name, url, backend(url).check_options(options), source)
