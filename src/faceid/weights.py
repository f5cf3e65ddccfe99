"""The one thing calls on a pipeline must share and cannot carry as arguments: the LoRA weights of its UNet.

Everything else a call changes is its own (its scheduler, token groups, gates, key/value cache, diffusers
pipeline object: see ``faceid.sampling``). LoRA weights are different: PEFT keeps them on the UNet's layers,
read by every forward pass of every caller. A call that needs other LoRA weights than the ones in force (its
own identity-LoRA weight, a few-step preset's LoRA, an identity window that switches the identity LoRA
between steps) therefore takes the UNet's ``WeightsGuard``:

* calls that need the same weights run together (the common case: every call at the adapter's defaults);
* a call that needs other weights waits until the running calls are done, then puts its weights in force;
* a call whose weights change between its steps (an identity window over a LoRA) runs alone;
* the last call to leave puts the user's settings back, so that between calls the UNet always holds what
  the user set (``adapter.lora_scale``, ``set_lora_weight``...), and loading, removing or re-weighting a
  LoRA (``exclusive``) waits for running calls instead of changing weights under them.

Waiters are served in arrival order, so a stream of calls at one setting cannot starve a call at another.
Every call gives exactly what it gives alone; calls at different weights only lose their overlap.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator

from torch import nn

from .errors import FaceIDError

__all__ = ["WeightsGuard", "weights_guard"]


class WeightsGuard:
    """Who may run on one UNet's LoRA weights now, and with which weights in force (see the module)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._in_force: Hashable | None = None  # the weights the holders run with (None: the user's settings)
        self._holders: dict[int, int] = {}  # thread id -> how many holds it has
        self._alone = False  # the holder runs alone (its weights change between steps, or it edits them)
        self._restore: Callable[[], None] | None = None
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def hold(
        self,
        weights: Hashable | None,
        apply: Callable[[], None] = lambda: None,
        restore: Callable[[], None] = lambda: None,
        alone: bool = False,
    ) -> Iterator[None]:
        """Run the block with ``weights`` in force: ``None`` for the user's settings (nothing applied), else a
        hashable description of the weights, which ``apply`` puts in force and ``restore`` takes out again
        when the last holder leaves. ``alone``: no other call runs meanwhile."""
        me = threading.get_ident()
        ticket = object()
        with self._lock:
            if me in self._holders:
                self._reenter(me, weights, alone)
            else:
                self._queue.append(ticket)
                try:
                    self._lock.wait_for(lambda: self._may_enter(ticket, weights, alone))
                finally:
                    self._queue.remove(ticket)
                if not self._holders and weights is not None:
                    apply()  # the first holder of these weights puts them in force
                    self._in_force, self._restore = weights, restore
                self._alone = alone
                self._lock.notify_all()  # the next waiter may be compatible too
            self._holders[me] = self._holders.get(me, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._holders[me] -= 1
                if not self._holders[me]:
                    del self._holders[me]
                if not self._holders:
                    if self._restore is not None:
                        self._restore()
                    self._in_force, self._restore, self._alone = None, None, False
                self._lock.notify_all()

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the UNet alone at the user's settings: for loading, removing or re-weighting a LoRA."""
        return self.hold(None, alone=True)

    def _may_enter(self, ticket: object, weights: Hashable | None, alone: bool) -> bool:
        if self._queue[0] is not ticket:
            return False  # first come, first served
        if not self._holders:
            return True
        return not alone and not self._alone and weights == self._in_force

    def _reenter(self, me: int, weights: Hashable | None, alone: bool) -> None:
        """A holder asking again from its own thread (a step callback that edits a LoRA, a part of a batch):
        fine when it is the only holder or asks for what is in force; anything else would wait on itself."""
        if len(self._holders) == 1 or (not alone and weights == self._in_force):
            return
        raise FaceIDError(
            "the UNet's LoRA weights cannot change inside a call while other calls run on it: change them between "
            "calls (load_lora, set_lora_weight, adapter.set_lora_scale...)"
        )


_GUARDS: weakref.WeakKeyDictionary[nn.Module, WeightsGuard] = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def weights_guard(unet: nn.Module) -> WeightsGuard:
    """The guard of ``unet``'s LoRA weights: one per UNet, shared by everything that changes or runs on them."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(unet)
        if guard is None:
            guard = _GUARDS[unet] = WeightsGuard()
        return guard
