"""The benchmark's errors, in a module of their own so that the CLI can name them without importing the data
loaders (and with them numpy, which only the `bench` extra installs)."""


class DataUnavailable(RuntimeError):
    """A data set could not be found, fetched or read; the message says which file and what to do."""


class UsageError(ValueError):
    """A mistake on the command line: the message names the option, what is wrong and what is allowed."""
