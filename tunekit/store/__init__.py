"""The one store: SQLite at ``$TUNEKIT_HOME/state.db`` (jobs, events, metrics, adapter registry)."""

from .db import AdapterRecord, JobRecord, Store, default_store

__all__ = ["AdapterRecord", "JobRecord", "Store", "default_store"]
