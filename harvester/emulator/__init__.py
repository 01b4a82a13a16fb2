"""The built-in provider emulator: faithful imitations of the provider APIs, a signed-URL
storage host, scenario-driven faults, and the ground truth of every result it serves.

It is written from the API descriptions alone and imports nothing from ``harvester.providers``,
``harvester.transport`` or ``harvester.engine``: a misunderstanding shared by client and
emulator would otherwise pass every test.
"""

from harvester.emulator.scenario import FaultSpec, Scenario, ScenarioError, load_scenario
from harvester.emulator.server import Emulator, main
from harvester.emulator.state import EmulatorState

__all__ = [
    "Emulator",
    "EmulatorState",
    "FaultSpec",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "main",
]
