"""The process Lambda keeps warm: one event loop for every invocation, each entry point's
worker made once, and what SnapStart needs around a snapshot.

Lambda runs `handler.py`'s functions synchronously, many times in one process, with
freezes in between. The SMTP pool and the AWS clients belong to the event loop that made
them, so one `asyncio.Runner` serves the whole process instead of a loop per invocation.
`start` makes an entry point's worker with the factory `handler.py` wired in (settings
parsed, templates compiled, clients made, nothing connected): `handler.py` calls `init`
at import in Lambda, so that work is the init phase; elsewhere the first invocation does it.

Every line logged inside Lambda carries its keys (`invocation.py`): the function's, and
within an invocation its request id, `cold_start` and X-Ray trace. The first invocation of
the process, and the first after a SnapStart restore, is the cold start: its lines say
`cold_start: true` and it writes the `ColdStart` metric.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .batch.notifier import Notifier
from .batch.ses_recorder import SesEventsRecorder
from .invocation import cold_start_metrics, function_keys, invocation_keys
from .logs import bound

T = TypeVar("T")
Worker = Notifier | SesEventsRecorder
BatchResponse = dict[str, list[dict[str, str]]]


class LambdaProcess:
    """The warm process's state. `notifier` and `ses_recorder` are None until started."""

    def __init__(
        self,
        *,
        notifier: Callable[[], Notifier],
        ses_recorder: Callable[[], SesEventsRecorder],
    ) -> None:
        self._make_notifier = notifier
        self._make_ses_recorder = ses_recorder
        self.notifier: Notifier | None = None
        self.ses_recorder: SesEventsRecorder | None = None
        self._loop: asyncio.Runner | None = None
        self._cold = True  # the next invocation is the process's first (or a restore's)

    def invoke(self, event: Any, context: Any, *, ses_events: bool) -> BatchResponse:
        """One invocation of an entry point, on the process's loop, its lines carrying its
        request id and Lambda's keys."""
        cold = self._cold
        request = getattr(context, "aws_request_id", None)
        keys = invocation_keys(context, cold_start=cold, environ=os.environ)
        with bound(request=request, keys=keys):
            worker = self.start(ses_events=ses_events)
            if cold:  # once started: a failed start leaves the next invocation cold
                self._cold = False
                namespace = worker.settings.metrics_namespace
                cold_start_metrics(namespace, keys.get("function_name"), request).emit()
            return self.run(worker.handle(event, context))

    def init(self, *, ses_events: bool) -> Worker:
        """Lambda's init phase: `start`, its lines carrying the function's keys."""
        with bound(keys=function_keys(os.environ)):
            return self.start(ses_events=ses_events)

    def start(self, *, ses_events: bool) -> Worker:
        """The entry point's worker, made once (ConfigError on a broken setting)."""
        if ses_events:
            if self.ses_recorder is None:
                recorder = self._make_ses_recorder()
                self.run(recorder.prepare())
                self.ses_recorder = recorder
            return self.ses_recorder
        if self.notifier is None:
            notifier = self._make_notifier()
            self.run(notifier.prepare())
            self.notifier = notifier
        return self.notifier

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the process's loop, in the caller's context (its log keys):
        Runner.run would otherwise use the context captured when the loop was made."""
        return self._runner().run(coroutine, context=contextvars.copy_context())

    def reset(self) -> None:
        """Close the warm clients, forget the settings and close the loop, as a new process
        would start (tests change the environment between cases)."""
        for worker in self._workers():
            self.run(worker.aclose())
        self.notifier = self.ses_recorder = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        self._cold = True

    def before_snapshot(self) -> None:
        """SnapStart: no socket goes into the snapshot (SMTP connections say QUIT, AWS
        clients close their HTTP connections), nor the secrets the init read to check them;
        every copy restored from it connects and reads afresh."""
        with bound(keys=function_keys(os.environ)):
            for worker in self._workers():
                worker.forget_secrets()
                self.run(worker.aclose())

    def after_restore(self) -> None:
        """SnapStart: the copies of one snapshot must not share what was made before it: the
        random state (MIME boundaries, retry jitter) is seeded anew, secrets that may have
        rotated are read again, and new clients are made (still connecting nothing). The
        copy's first invocation is a cold start, whatever the snapshot's process did."""
        random.seed()
        self._cold = True
        with bound(keys=function_keys(os.environ)):
            for worker in self._workers():
                worker.forget_secrets()
                self.run(worker.prepare())

    def _workers(self) -> list[Worker]:
        return [w for w in (self.notifier, self.ses_recorder) if w is not None]

    def _runner(self) -> asyncio.Runner:
        if self._loop is None:
            self._loop = asyncio.Runner()
        return self._loop
