"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class PseudolabelError(Exception):
    """Base class: something about the input, the config or the storage is wrong."""


class ConfigError(PseudolabelError):
    """A setting is missing, unknown or out of range."""


class InputError(PseudolabelError):
    """The input data is unusable; the message names the file, and the row or column."""


class StorageError(PseudolabelError):
    """The object store refused or could not be reached."""


class ResourceError(PseudolabelError):
    """The cluster cannot (or did not in time) provide the requested workers."""
