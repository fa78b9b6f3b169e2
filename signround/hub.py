"""Whether the Hugging Face hub can be reached, asked cheaply before libraries that retry for a while."""

from __future__ import annotations

import os
import re
import socket

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: "books/" or "a/b/c" are paths


def looks_like_hub_id(text: str) -> bool:
    """Shaped as a hub repository id (owner/name), for models and datasets alike."""
    return bool(_HUB_ID.match(text))


def hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True
