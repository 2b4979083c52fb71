"""Keeper: keeps one long-lived "hold" request on every worker of a continuous-batching model,
so that no worker ever sits in TorchServe 0.12's job poll with nothing in flight.

Why (docs/serving.md, "Several workers"): with ``continuousBatching`` every worker takes its
next call's jobs through ``Model.pollInferJob``, under one lock per model; a worker with no job
waits there for a new one (``poll(Long.MAX_VALUE)``) while holding that lock, so a worker with
streams in flight cannot take its next step until a new request arrives. A worker that holds
a request is never in that wait. The hold request is an ordinary inference request to
``/predictions/<model>/1.0/hold`` that the handler keeps open without ever sending a byte
(``""`` with criterion False each call); a worker holds at most one and answers any other
at once (a complete response), so there are never more holds than workers.

The hold a worker sends may be taken by any worker that polls first. So each worker loops:
while it holds none and none of its sends waits for an answer, it sends one; the worker
that has none and waits in the poll takes it (the others, blocked on the lock, cannot).
A reader thread per send keeps the connection open while some worker holds it (TorchServe
drops a job whose client is gone); when that worker dies the connection is cut and the
thread ends. The frontend's address and, with token authorization, its key file come from
the environment TorchServe passes to its workers (``LLM_FRONTEND_URL``,
``LLM_FRONTEND_KEY_FILE``); without an address there is no keeper.
"""
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import requests

logger = logging.getLogger(__name__)
ROUTE = "hold"
URL_ENV, KEY_FILE_ENV = "LLM_FRONTEND_URL", "LLM_FRONTEND_KEY_FILE"


class Keeper:
    """Sends hold requests for this worker until ``holding()`` is true; ``stop`` ends it."""

    def __init__(self, url: str, key_file: str | None, model_name: str,
                 holding: Callable[[], bool], check_s: float = 0.05) -> None:
        self.target = f"{url.rstrip('/')}/predictions/{model_name}/1.0/{ROUTE}"
        self.key_file = Path(key_file) if key_file else None
        self.holding = holding
        self.check_s = check_s
        self._asking = threading.Event()      # a send waits for its first answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keeper", daemon=True)

    @classmethod
    def from_env(cls, model_name: str, holding: Callable[[], bool]) -> "Keeper | None":
        url = os.environ.get(URL_ENV)
        if not url or os.environ.get("LOCAL_RANK", "0") != "0":   # torchrun: rank 0 answers
            return None
        return cls(url, os.environ.get(KEY_FILE_ENV), model_name, holding)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            if not self.holding() and not self._asking.is_set():
                self._asking.set()
                threading.Thread(target=self._send, name="keeper-send", daemon=True).start()

    def _headers(self) -> dict[str, str]:
        """The inference key, read again each time (TorchServe rotates it)."""
        if self.key_file is None:
            return {}
        try:
            key = json.loads(self.key_file.read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("keeper: no inference key in %s: %s", self.key_file, exc)
            return {}
        return {"Authorization": f"Bearer {key}"}

    def _send(self) -> None:
        try:
            with requests.post(self.target, json={"pid": os.getpid()}, headers=self._headers(),
                               stream=True, timeout=(10, None)) as reply:
                self._asking.clear()        # taken and answered: held somewhere, or refused
                if reply.status_code != 200:
                    logger.warning("keeper: %s answered %s: %s", self.target,
                                   reply.status_code, reply.text[:200])
                    self._stop.wait(1.0)    # e.g. a wrong key: do not hammer the frontend
                for _ in reply.iter_content(chunk_size=None):
                    pass                    # open while held; ends when its worker goes
        except requests.RequestException as exc:
            logger.debug("keeper: hold request ended: %s", type(exc).__name__)
            self._stop.wait(0.5)
        finally:
            self._asking.clear()
