"""Together AI backend (``backend="together"``). The SDK is imported only when a job is submitted or polled:
importing this package, planning and validating never import ``together``."""
