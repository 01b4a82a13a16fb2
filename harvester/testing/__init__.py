"""The real engine without sockets or real time: for tests and the scheduling simulator.

- ``network``: ``MemoryNetwork``, an ``ExchangeFactory`` whose exchanges deliver requests to
  handlers in memory (with injectable faults: an answer lost after the provider acted, a
  reset before it, a canned answer such as a 429), on the engine's clock;
- ``playment``: ``MemoryPlayment``, Playment's API and storage host in memory, backed by the
  emulator's own model and result files (``harvester.emulator.playment_model``);
- ``bentley``: ``MemoryBentley``, Bentley's Reality Analysis and readaccess on the emulator's
  ``BentleyModel``, with its token endpoint (``oauth``) and its output containers (``azure``:
  SAS-signed Azure containers, listed and read as the emulator serves them);
- ``modzy``: ``MemoryModzy``, Modzy's jobs and results on the emulator's ``ModzyModel``;
- ``virtual``: running it all on a ``FakeClock`` (``threads_inline``, ``run_until``).

Everything else (limiter, retries, error classification, credentials, store, harvest,
decode) is the production code, unmodified. This package is the top layer: nothing in
harvester imports it (``tests/unit/test_layers.py``), and it is the only client-side code
allowed to use the emulator, since what it builds is a stand-in for a provider.
"""
