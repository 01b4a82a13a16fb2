"""Providers' published API definitions, vendored as data, with small readers of them.

Neither the client side (``providers/``) nor the emulator owns these: both check bodies
against the provider's own schema, and the contract tests prove each vendored file equals
what the provider's page (``../shared/seeds``) publishes.
"""
