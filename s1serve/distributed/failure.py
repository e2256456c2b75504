"""How a worker's end is told to the engine."""


class WorkerDied(RuntimeError):
    """A rank's process ended while the engine needed it."""
