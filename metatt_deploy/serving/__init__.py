"""Running exports in production: `runtime` loads any export once on ONNX Runtime and predicts
any task, per call or per row, without reloading the model; `batcher`, `app`, `http`,
`schemas`, `metrics` and `server` put it behind an HTTP service (FastAPI + uvicorn) that
batches requests across tasks; `ray_app` runs the same code as a Ray Serve deployment.
"""
