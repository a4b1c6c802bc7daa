"""Fireworks AI backend (``pip install tunekit[fireworks]``). Imported lazily by the registry: nothing here
imports the SDK; ``backend.py`` does, inside the functions that need it."""
