"""`gpt2kit serve`: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md).

`scheduler` batches decode steps over every active sequence (`batch_cache` holds their keys/values),
`app` holds the routes and OpenAI's request/response/error shapes, `metrics` the Prometheus text.
"""
