"""A task for map_in_processes that kills its worker on "b", in a module that imports nothing heavy.

Spawned workers import the module their task function lives in: from test_reliability, whose
imports reach TensorFlow, each of the test's eight fresh processes spent seconds importing it
(47 s for six one-letter tasks)."""

import os
import signal


def dies_on_b(task: str) -> str:
    if task == "b":
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    return task.upper()
