"""The OpenAI-compatible server: ``python -m xllm.serve`` (docs/serving.rst).

protocol.py holds the request bodies and the error JSON, app.py the endpoints over the engine
(xllm/engine/scheduler.py), metrics.py the Prometheus metrics, options.py the command line's
options and defaults, server.py the command line; ray.py serves the same application from Ray
Serve replicas of the engine (docs/scaling.rst)."""
