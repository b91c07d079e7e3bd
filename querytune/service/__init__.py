"""``querytune serve``: the multi-task engine (:mod:`querytune.serve`) behind HTTP, on Starlette and uvicorn
(the optional extra ``querytune[serve]``).

    POST /predict[?topk=K&tasks=a,b&logits=1]  images as multipart files or one image as the raw body
    GET  /tasks                                 the tasks: run, method, classes, whether it shares the trunk
    GET  /health                                status, and the batches and images answered so far (no token)
    GET  /metrics                               the counts in the Prometheus text format
    GET  /                                      a page to drop an image on and read every task's answer

Requests arriving together are batched: the first waits at most ``max_wait_ms`` for others, and a batch
holds at most ``max_batch`` images. The model runs in a worker thread, so the server keeps reading
requests meanwhile. Every bad request (empty or oversized body, a body that is not an image, an unknown
task, too many images or decoded bytes, a client too slow to send its headers or body) gets a 4xx JSON
``{"error": ...}``.

With a token (:class:`ServiceAccess`), every request but ``GET /health`` and the page's own HTML must carry
``Authorization: Bearer <token>`` (else 401); the page asks for the token and sends it with each request it
makes. A client (by address) with ``max_inflight_per_client`` requests unanswered gets 429 for more. Each
request is counted for ``/metrics`` and, given a log, written to it as one JSON line (never its body).
See docs/serving.md.

The package's modules: :mod:`.limits` (:class:`ServiceLimits`, from which ``querytune serve``'s limit flags are
generated), :mod:`.access` (the token, the access log and the :class:`~.access.Gate` middleware), :mod:`.metrics`
(``/metrics``), :mod:`.batcher` (:class:`~.batcher.Batcher`), :mod:`.connections` (the header timeout and the
connection limits in uvicorn's protocol), :mod:`.images` (decoding in bounded memory) and :mod:`.app` (the routes
and the page, ``service.html``).
"""

from .access import ServiceAccess
from .app import create_app, serve
from .limits import ServiceLimits

__all__ = ["ServiceAccess", "ServiceLimits", "create_app", "serve"]
