"""Errors that the user can fix by changing a setting."""


class ConfigError(ValueError):
    """A bad setting or missing file, reported as one line naming the setting and what is accepted,
    before any work starts."""
