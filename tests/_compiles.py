"""Counting XLA compilations through JAX's public monitoring events (no private jit caches)."""

import contextlib

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """The XLA programs compiled inside a :func:`count_compiles` block.

    ``names`` lists them in order, as JAX names them (``"jit(<function name>)"``); ``count`` is how many.
    """

    def __init__(self):
        self.names: list[str] = []

    @property
    def count(self) -> int:
        return len(self.names)

    def of(self, function: str) -> list[str]:
        """The compiled programs of the jitted function named ``function``."""
        return [name for name in self.names if name == f"jit({function})"]

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))


@contextlib.contextmanager
def count_compiles():
    """``with count_compiles() as c: ...`` then ``c.count`` is how many programs XLA compiled in the block."""
    compiles = Compiles()
    jax.monitoring.register_event_duration_secs_listener(compiles._listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(compiles._listener)
