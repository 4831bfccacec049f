"""Running exports in production, on the inference floor alone (no torch): `runtime` loads any
classifier export once on ONNX Runtime and predicts any task, per call or per row, without
reloading the model; `generate` (and `genai` on ONNX Runtime GenAI) streams a decoder's answers
for any task of a bundle; `batcher`, `app`, `http`, `schemas`, `metrics` and `server` put the
classifiers behind an HTTP service (FastAPI + uvicorn) that batches requests across tasks;
`ray_app` runs the same code as a Ray Serve deployment.
"""
