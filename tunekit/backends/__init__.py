"""Backends: one subpackage per provider; the registry imports them lazily by name."""

from ._registry import available_backends, get_backend, get_backend_class, register_backend

__all__ = ["available_backends", "get_backend", "get_backend_class", "register_backend"]
