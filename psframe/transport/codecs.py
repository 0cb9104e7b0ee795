"""Codecs: what a payload frame is on the wire, as an encode/decode pair per frame."""
from __future__ import annotations

from typing import Dict, Type

import numpy as np

__all__ = ["Codec", "Identity", "codec_for", "CODECS"]


class Codec:
    """How one frame of a flat buffer travels: its element type and count on the wire, and
    the pair that turns elements [a, b) into a wire array and back.

    Both ends of a link hold the same codec, so each sizes its buffers from it; the channel
    sends whatever array the codec hands it (its dtype is the wire's). A codec that keeps
    state per peer (an error-feedback residual) is made once per link end.

    The identity codec sends the buffer's own elements where they lie: no copy either way.
    A 16-bit or top-k codec encodes into a wire buffer of its own and decodes the landed one
    into place (``decode`` after each frame lands, before anything reads it).
    """

    name = "codec"
    #: Frames are sent and received where they lie, and decode does nothing: a landing then
    #: needs no bookkeeping of which frames it has decoded.
    in_place = False

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)  # the flat buffer's element type

    @property
    def wire_dtype(self) -> np.dtype:
        """The element type on the wire."""
        raise NotImplementedError

    def wire_count(self, elements: int) -> int:
        """Wire elements of a frame of ``elements`` buffer elements (sizes its receive)."""
        raise NotImplementedError

    def encode(self, flat: np.ndarray, a: int, b: int) -> np.ndarray:
        """Elements [a, b) of ``flat`` as the array to send (valid until the send is done)."""
        raise NotImplementedError

    def landing(self, flat: np.ndarray, a: int, b: int) -> np.ndarray:
        """Where the wire array of elements [a, b) of ``flat`` is received."""
        raise NotImplementedError

    def decode(self, flat: np.ndarray, a: int, b: int) -> None:
        """After frame [a, b) has landed: its elements into ``flat`` (nothing in place)."""
        raise NotImplementedError


class Identity(Codec):
    """The buffer's own elements, sent and received in place."""

    name = "none"
    in_place = True

    @property
    def wire_dtype(self) -> np.dtype:
        return self.dtype

    def wire_count(self, elements: int) -> int:
        return elements

    def encode(self, flat: np.ndarray, a: int, b: int) -> np.ndarray:
        return flat[a:b]

    def landing(self, flat: np.ndarray, a: int, b: int) -> np.ndarray:
        return flat[a:b]

    def decode(self, flat: np.ndarray, a: int, b: int) -> None:
        return None  # it landed where it belongs


CODECS: Dict[str, Type[Codec]] = {Identity.name: Identity}


def codec_for(name: str, dtype: np.dtype) -> Codec:
    """A codec by its name (the run's compression setting; "none" today)."""
    try:
        return CODECS[name](dtype)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
