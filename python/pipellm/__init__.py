"""pipellm: confidential LLM serving without the confidential-computing tax.

The secure transfer channel (AES-256-GCM, one IV counter per direction, receiver that
accepts only the next message) is implemented in Rust (`pipellm._core`); this package is
its Python face. How the pieces fit together: docs/architecture.md in the repository.
"""

from ._core import (
    DEFAULT_USAGE_LIMIT,
    HEADER_LEN,
    MAX_CHANNEL,
    MAX_HISTORY,
    MAX_KEEP_ARMED,
    MAX_PREDICT,
    MAX_TRANSFER_CHUNKS,
    ArgumentRangeError,
    AuthenticationError,
    CapacityError,
    HostPool,
    IvExhaustedError,
    IvOrderError,
    LearnedPredictor,
    Message,
    Pipeline,
    PipelineClosedError,
    PipeLLMError,
    Receiver,
    Sender,
    SessionKey,
    Transfer,
    __version__,
    write_tracker,
)
from .predictors import AdapterQueue, LayerCycle, Learned, LoadOnce, SwapFifo
from .speculator import Speculator

__all__ = [
    "DEFAULT_USAGE_LIMIT",
    "HEADER_LEN",
    "MAX_CHANNEL",
    "MAX_HISTORY",
    "MAX_KEEP_ARMED",
    "MAX_PREDICT",
    "MAX_TRANSFER_CHUNKS",
    "AdapterQueue",
    "ArgumentRangeError",
    "AuthenticationError",
    "CapacityError",
    "HostPool",
    "IvExhaustedError",
    "IvOrderError",
    "LayerCycle",
    "Learned",
    "LearnedPredictor",
    "LoadOnce",
    "Message",
    "PipeLLMError",
    "Pipeline",
    "PipelineClosedError",
    "Receiver",
    "Sender",
    "SessionKey",
    "Speculator",
    "SwapFifo",
    "Transfer",
    "__version__",
    "write_tracker",
]
