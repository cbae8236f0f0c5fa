"""The serving side: FastAPI over ONNX Runtime. Never imports torch or the model package."""
