"""harvester: submit, track and harvest jobs from remote annotation/ML providers."""

__version__ = "0.1.0"
