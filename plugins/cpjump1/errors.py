"""Exceptions the stages raise for bad input.

Every error message names the file, plate or field at fault, so that a person reading an
Airflow task log or a pod log knows what to fix without reading a traceback.
"""


class Cpjump1Error(Exception):
    """Base class: a problem with the input or the configuration, reported to the user."""


class UnknownNameError(Cpjump1Error, KeyError):
    """An unknown batch, plate or other name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class MetadataError(Cpjump1Error):
    """A malformed metadata file; the message names the file and line."""


class InputDataError(Cpjump1Error):
    """Bad input data (images, tables); the message names the file and plate."""


class ValidationFailed(Cpjump1Error):
    """A Great Expectations suite failed; the message summarises each failed expectation."""


class StorageError(Cpjump1Error):
    """Storage could not be reached or read (after bounded retries)."""
