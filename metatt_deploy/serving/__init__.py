"""Running exports in production: `runtime` loads a bundle once on ONNX Runtime and
predicts any task, per call or per row, without reloading the model; `app` (FastAPI, with
`batcher`, `http`, `metrics`, `schemas`) serves it over HTTP with dynamic batching across tasks,
`server` runs it on uvicorn (`metatt-deploy serve`) and `ray_app` on Ray Serve replicas.
"""
