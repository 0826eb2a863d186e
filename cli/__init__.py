from .main import cli

__all__ = ["cli"]
