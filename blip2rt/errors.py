"""Errors blip2rt raises for bad input. The CLI turns each into a one-line reason and exit code 2."""


class Blip2rtError(Exception):
    """Base class: an input the user gave is wrong, and the message says which and why."""


class ImageError(Blip2rtError, ValueError):
    """An image could not be read or is unusable (missing, corrupt, truncated, too small)."""


class CheckpointError(Blip2rtError, ValueError):
    """A checkpoint or config is missing, unreadable, or does not match the model."""


class InputError(Blip2rtError, ValueError):
    """Arguments to an inference call do not fit together (batch sizes, missing heads, ...)."""
