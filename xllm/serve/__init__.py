"""The OpenAI-compatible server: ``python -m xllm.serve`` (docs/serving.rst).

protocol.py holds the request bodies and the error JSON, app.py the endpoints over the engine
(xllm/engine/scheduler.py), metrics.py the Prometheus metrics, server.py the command line."""
