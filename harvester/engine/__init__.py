"""The engine: store, scheduler, transports and harvest under one task group.

Per provider there is one *lane* (``harvester.lane``, opened by ``lanes``): a dispatcher
that hands due job keys to a bounded pool of workers, and the provider's transport (one
session, one limiter). Jobs that finished remotely go to a shared, bounded harvest pool, so
a slow disk slows downloads rather than growing memory.

One job's life, a module per step, each taking the engine's narrow ``view.View``:

- ``submit``: a ``new`` job's create request, its ``submitting`` intent committed first;
- ``reconcile``: a create whose answer was lost, found by reference id (or handled by the
  provider's ``on_lost_create`` policy), never resent blindly;
- ``poll``: a running job's status, until it ends;
- ``harvest``: a finished job's results, published once the job is proven still ours;
- ``output``: output.dir proven writable, and jobs parked while it is not;
- ``learned``: the poll schedulers' learned job durations, loaded from the store and merged
  into it (replicas pool what each learns);
- ``core``: the ``Engine`` that runs them: lanes, workers, the step that picks which of the
  above comes next, the harvest pool, drain, and state changes (``Engine.transition``).
  Cancels and deadlines are steps too, in ``harvester.control``.

Every state change is committed to the store before the engine acts on it.

``burst=True`` (``harvester harvest``) stops when every job it works on is terminal; the
daemon runs the same engine with ``burst=False`` until told to stop.

Which jobs this process works is its ``Ownership`` (``harvester.ownership``): ``Solo`` owns
every job in the store; with a store several processes share (``SharedStore``: PostgreSQL)
the engine is one ``Replica`` among several, which claims jobs by lease as its lanes have
room and treats a refused write as "this job is somebody else's now" (it drops the job)
rather than as a fatal store error. Everything else runs the same under both.
"""

from harvester.engine.core import DURATIONS_META, Engine, offline
from harvester.engine.lanes import Transports as _Transports

__all__ = ["DURATIONS_META", "Engine", "_Transports", "offline"]
