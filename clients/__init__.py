"""steerserve's Python client helpers and CLIs (`steerserve chat`, `steerserve bench`)."""

from .steer import Steer

__all__ = ["Steer"]
