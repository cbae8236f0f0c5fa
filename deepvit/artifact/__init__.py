"""The artifact contract: the one thing the model side and the serving side share.

A ``model.onnx`` written by ``deepvit export`` describes itself. This package, which imports neither torch nor
FastAPI, is the only code that writes or reads that description and the only code that turns image bytes into
the graph's input, so that export, ``verify``, ``inspect``, ``evaluate`` and the service cannot drift apart:

- :mod:`.metadata`: the typed metadata object (schema-versioned) and the preprocessing spec, to and from the
  ONNX ``metadata_props``;
- :mod:`.pixels`: the pixel path, bytes → the RGB picture a user sees → resize → centre crop (``uint8``);
- :mod:`.session`: ONNX Runtime session construction, and reading an artifact's metadata.
"""

from .errors import ArtifactError, ImageError, ImageTooLargeError
from .metadata import (
    ATTENTION_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    SCHEMA_VERSION,
    ArtifactMetadata,
    AttentionSpec,
    PreprocessSpec,
)

__all__ = [
    "ATTENTION_NAME",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "SCHEMA_VERSION",
    "ArtifactError",
    "ArtifactMetadata",
    "AttentionSpec",
    "ImageError",
    "ImageTooLargeError",
    "PreprocessSpec",
]
