"""worker.py that ends its own process right after one effect, before the activity completes.

Tests only: `python tests/e2e/crash_after_effect.py --region R --control`, with
`LETHE_TEST_CRASH_AFTER=module:Class.method` naming the connector method that makes the effect
(e.g. `lethe.activities.kafka:TombstoneWriter._produce_tombstone`, which returns once the broker has
acknowledged the tombstone). The method is wrapped to call the original and then end the
process with `os._exit(9)`: no activity completion, no heartbeat after it, no shutdown. Then
worker.py's `main` runs with the same arguments. Production code has no hook for this.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[2]
CRASH_AFTER = "LETHE_TEST_CRASH_AFTER"
"""The variable naming the method after which the process ends: `module:Class.method`."""
EXIT_CODE = 9
MARKER = "crash_after_effect: the effect is made; ending the process before the activity completes"
"""What the script writes to stderr (the worker's log) just before it ends the process."""


def _end() -> NoReturn:
    print(MARKER, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_CODE)


def crash_after(target: str) -> None:
    """Wrap the method `target` (`module:Class.method`) to end the process once it returned."""
    module_name, _, attribute = target.partition(":")
    owner_path, _, name = attribute.rpartition(".")
    if not module_name or not name:
        raise SystemExit(f"{CRASH_AFTER} must be module:Class.method, not {target!r}")
    owner: Any = importlib.import_module(module_name)
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    original: Callable[..., Any] = getattr(owner, name)
    wrapped: Callable[..., Any]
    if inspect.iscoroutinefunction(original):

        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            await original(*args, **kwargs)
            _end()

        wrapped = wrapped_async
    else:

        def wrapped_sync(*args: Any, **kwargs: Any) -> Any:
            original(*args, **kwargs)
            _end()

        wrapped = wrapped_sync
    setattr(owner, name, functools.wraps(original)(wrapped))


def main() -> int:
    """Patch the method the environment names, then run the worker."""
    sys.path.insert(0, str(ROOT))
    target = os.environ.get(CRASH_AFTER)
    if not target:
        raise SystemExit(f"{CRASH_AFTER} is not set")
    crash_after(target)
    from lethe import worker

    return worker.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
