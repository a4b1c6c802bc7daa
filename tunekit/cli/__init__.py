"""The ``tunekit`` command line: one module per noun, thin over the Python API."""
