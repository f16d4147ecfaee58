"""How the worker's copies meet the forward pass on the KV's device.

On CUDA, each copy thread issues its copies on a stream of its own, so they run beside the
forward's kernels instead of queueing behind them on its stream; an event recorded after a
layer's copies is what the forward's stream waits on before it runs that layer (the host
never waits for a load), and a save's copies of a layer start only after an event the
forward recorded once the layer ran. Host memory the copies read or write (the node's
shared memory, under a lease or a reservation) is released or committed only after
:meth:`Copies.finish`: a copy from or into page-locked memory is asynchronous.

The node's shared memory can be page-locked for the device (:func:`pin_host_memory`), so
host-to-device copies read it directly at DMA speed, with no staging copy.

On the CPU all of this is plain: copies run where they are called, events are None.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

Event = Any
"""A ``torch.cuda.Event`` on CUDA; None on the CPU (nothing to wait for)."""


class Copies:
    """Copies to and from ``device`` issued by one thread (on CUDA: on one side stream)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def run(self, copy: Callable[[], None], after: Event = None) -> Event:
        """Issue ``copy`` (once ``after``, an event of the forward, has passed); an event that
        marks its end on the device."""
        if self.stream is None:
            copy()
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            copy()
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.stream)
        return done

    def finish(self) -> None:
        """Wait until every copy issued so far is done (before host memory is let go)."""
        if self.stream is not None:
            self.stream.synchronize()


def forward_waits_for(event: Event) -> None:
    """The forward's stream runs nothing more until ``event`` (a layer's loads) has passed."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def forward_mark(device: torch.device) -> Event:
    """An event on the forward's stream after what it has issued so far (a layer that ran)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    return event


def pin_host_memory(buffer: memoryview) -> bool:
    """Page-lock ``buffer`` (a writable mapping, e.g. the node's shared memory) for CUDA, so
    copies between it and the device are DMA transfers. False (and a warning) if the driver
    refuses; copies then go through the driver's staging buffers, as from any memory."""
    if not torch.cuda.is_available():
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        status = torch.cuda.cudart().cudaHostRegister(address, buffer.nbytes, 0)  # type: ignore[no-untyped-call]
        code = getattr(status, "value", status)
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        logger.warning("could not page-lock the node's shared memory for CUDA: %s", exc)
        return False
    if code != 0:
        logger.warning("could not page-lock the node's shared memory for CUDA: cudaError %s", code)
        return False
    logger.info("the node's shared memory (%.1f GiB) is page-locked for CUDA copies", buffer.nbytes / 2**30)
    return True
