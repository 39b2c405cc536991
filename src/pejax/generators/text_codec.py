"""Text samples as fixed-shape arrays: UTF-8 bytes, zero-padded.

A text generator (``modality = "text"``) makes samples as one uint8 array of shape (N, L): row i holds the
UTF-8 encoding of text i followed by zero bytes up to length L. Such an array is a pytree leaf like any image
batch, so the loop can index, concatenate and checkpoint it; text embeddings decode it back to strings.

Rules:
  * Encoding truncates a text longer than L bytes at the last whole character that fits (a multi-byte
    character is never split), so every row decodes to valid UTF-8.
  * NUL characters (U+0000) are dropped on encoding: byte 0 is the padding.
  * Decoding drops the zero padding (every byte from the first zero on) and replaces malformed UTF-8 (rows not
    made by :func:`encode_texts`) with U+FFFD.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_mask_token(mask_token) -> str:
    """Returns ``mask_token`` after checking it is one non-empty word (the fill-in-the-blanks mask of Aug-PE)."""
    if (
        not isinstance(mask_token, str)
        or not mask_token.strip()
        or any(c.isspace() for c in mask_token)
    ):
        raise ValueError(
            f"mask_token must be a non-empty string without spaces, got {mask_token!r}."
        )
    return mask_token


def _truncate(data: bytes, max_bytes: int) -> bytes:
    if len(data) <= max_bytes:
        return data
    cut = max_bytes
    # Back off over continuation bytes (0b10xxxxxx) so that the cut falls before a character's first byte.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


def encode_texts(texts: Sequence[str], max_bytes: int) -> np.ndarray:
    """Encodes texts as a zero-padded (N, max_bytes) uint8 array of UTF-8 bytes.

    Args:
      texts: a sequence (list or tuple) of N strings. A single string is refused (it would be read as a
        sequence of characters).
      max_bytes: L, the row length in bytes (>= 1). Longer texts are truncated on a character boundary.

    Returns:
      uint8 array of shape (N, max_bytes).

    Raises:
      TypeError: ``texts`` is a string or holds non-strings; ``max_bytes`` is not an integer.
      ValueError: ``max_bytes`` < 1.

    Example:
      >>> arr = encode_texts(["héllo", "a"], max_bytes=4)
      >>> arr.shape, arr.dtype.name
      ((2, 4), 'uint8')
      >>> decode_texts(arr)
      ['hél', 'a']
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral):
        raise TypeError(f"max_bytes must be an integer >= 1, got {max_bytes!r}.")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes}.")
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise TypeError(
            f"texts must be a list or tuple of strings, got {type(texts).__name__}; wrap a single text "
            "as [text]."
        )
    out = np.zeros((len(texts), int(max_bytes)), np.uint8)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}: {text!r}.")
        data = _truncate(text.replace("\x00", "").encode("utf-8"), int(max_bytes))
        out[i, : len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode_texts(arr: Any) -> list[str]:
    """Decodes a (N, L) uint8 array of zero-padded UTF-8 bytes back to N strings.

    Args:
      arr: uint8 array (NumPy or JAX) of shape (N, L), as made by :func:`encode_texts`.

    Returns:
      list of N strings (padding removed).

    Raises:
      ValueError: ``arr`` is not 2-D.
      TypeError: ``arr`` is not uint8.

    Example:
      >>> decode_texts(encode_texts(["PE", ""], max_bytes=3))
      ['PE', '']
    """
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(
            f"text samples must be a 2-D array (N, L) of UTF-8 bytes, got shape {a.shape}."
        )
    if a.dtype != np.uint8:
        raise TypeError(
            f"text samples must be uint8 (UTF-8 bytes, zero-padded), got dtype {a.dtype}; make them with "
            "pejax.generators.text_codec.encode_texts."
        )
    texts = []
    for row in a:
        data = row.tobytes()
        end = data.find(b"\x00")
        if end >= 0:
            data = data[:end]
        texts.append(data.decode("utf-8", errors="replace"))
    return texts


__all__ = ["check_mask_token", "decode_texts", "encode_texts"]
