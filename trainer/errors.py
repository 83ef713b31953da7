"""Exceptions that carry a message meant for the person running imgclf."""


class ImgclfError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class HyperparameterError(ImgclfError):
    """One or more hyperparameters are invalid; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid hyperparameters:\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(ImgclfError):
    """The data set cannot be used as it is (missing, empty, unreadable, inconsistent)."""


class StorageError(ImgclfError):
    """A local path or gs:// URI could not be listed, read or written."""


class ModelError(ImgclfError):
    """A model file or directory cannot be loaded or does not fit the data."""
