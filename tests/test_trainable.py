"""What a trial's worker process shows of itself: only its trial's output."""
from __future__ import annotations

import os
import signal
import sys
import weakref

from genre_ray import trainable


def test_rays_exit_landing_in_a_weakref_callback_prints_no_traceback(monkeypatch, capsys):
    """Ray ends a worker with SIGTERM, whose handler raises SystemExit wherever the worker
    is; in a weakref callback Python prints it as "Exception ignored" with a traceback,
    which the driver shows as the trial's. A real error there is still printed."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    previous = signal.signal(signal.SIGUSR1, lambda *_: sys.exit(1))  # Ray's handler's way
    trainable.quiet_exit_in_callbacks()

    class Held:
        pass

    def signalled(_):
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs here, inside the callback

    def failed(_):
        raise ValueError("a real error")

    refs = []  # a callback runs only while its weakref lives
    try:
        for callback in (signalled, failed):
            held = Held()
            refs.append(weakref.ref(held, callback))
            del held
    finally:
        signal.signal(signal.SIGUSR1, previous)
    err = capsys.readouterr().err
    assert "SystemExit" not in err and "Traceback" in err and "ValueError: a real error" in err
