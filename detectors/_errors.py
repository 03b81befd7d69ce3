"""Error types of the profile layer."""


class ProfileError(ValueError):
    """A profile or reference file is unusable; the message names the file and the check that failed."""
