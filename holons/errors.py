"""Exceptions that mean "the user's input is wrong", shown by the CLI as one clear line."""


class HolonsError(Exception):
    """Base class for errors caused by input, configuration or environment (not bugs)."""


class ConfigError(HolonsError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""
