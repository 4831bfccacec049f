"""metatt-deploy: MetaTT tensor-train adapters from training to ONNX Runtime."""

__version__ = "0.1.0"
