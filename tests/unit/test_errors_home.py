"""Every exception class harvester defines lives in ``harvester/errors.py``: one tree to read,
one place to look for what may be raised. Left out: the emulator, its own program (it speaks
the providers' error vocabularies, not ours), and ``harvester.testing``, the tests' stand-ins
(its ``VirtualTimeout`` is a failed test's assertion, never raised by harvester itself)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import harvester


def test_no_exception_class_is_defined_outside_errors_py() -> None:
    offenders = []
    for info in pkgutil.walk_packages(harvester.__path__, "harvester."):
        if info.name.startswith(("harvester.emulator", "harvester.testing", "harvester.errors")):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                offenders.append(f"{info.name}.{name}")
    assert offenders == []
