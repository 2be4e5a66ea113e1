"""Export a checkpoint to other runtimes: GGUF for llama.cpp (`gguf.py`), ONNX for onnxruntime (`onnx.py`)."""
