"""Running exports in production: `runtime` loads a bundle once on ONNX Runtime and
predicts any task, per call or per row, without reloading the model.
"""
