"""The HTTP layer: dependencies (deps.py) and thin route modules (routes/)."""
