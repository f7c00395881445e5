"""kvrecall: a Python client for the kvrecall KV-cache offload sidecar.

Needs numpy and msgpack only (the decode stream's WebSocket is
`kvrecall.websocket`, standard library). `kvrecall.hf` (a Hugging Face transformers
attention adapter) imports torch and transformers when it is imported.
"""

from .client import (
    AttendResult,
    BatchResult,
    Client,
    KvrecallError,
    decode_tensor,
    from_bf16_bits,
    model_shape,
    tensor,
    to_bf16_bits,
)
from .stacked import Stacked
from .stream import Stream

__version__ = "0.1.0"

__all__ = [
    "AttendResult",
    "BatchResult",
    "Client",
    "KvrecallError",
    "decode_tensor",
    "from_bf16_bits",
    "model_shape",
    "Stacked",
    "Stream",
    "tensor",
    "to_bf16_bits",
    "__version__",
]
