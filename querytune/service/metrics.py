"""What ``GET /metrics`` shows: per route and status the requests answered and their latency, per task the
predictions answered and their latency, the images of each model call, the images answered, the requests in
flight, and the connections closed or refused outside a request, in the Prometheus text format."""

from __future__ import annotations

from bisect import bisect_left

ROUTES = ("/", "/predict", "/tasks", "/health", "/metrics")  # the label values of /metrics (others: "other")
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, Prometheus' defaults


def label(value: str) -> str:
    """``value`` escaped as a label value of the text format (a task is named after its folder)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """Counts of observed values at or below each bound (a Prometheus histogram)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The exposition's ``_bucket`` (cumulative), ``_sum`` and ``_count`` lines; ``labels`` like ``a="b",``."""
        lines, total = [], 0
        for bound, count in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), self.counts):
            total += count
            lines.append(f'{name}_bucket{{{labels}le="{bound}"}} {total}')
        inner = labels.rstrip(",")
        suffix = f"{{{inner}}}" if inner else ""
        return [*lines, f"{name}_sum{suffix} {self.sum!r}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """What ``GET /metrics`` shows, in the Prometheus text format (version 0.0.4). Written out here rather than
    with prometheus_client: that is not a dependency, the format of these families is a few lines, and the
    counts live in one event loop (no locks needed)."""

    def __init__(self, max_batch: int) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.latency: dict[str, Histogram] = {}  # route -> seconds to answer
        self.task_latency: dict[str, Histogram] = {}  # task -> seconds to answer the predictions that asked for it
        self.batch_images = Histogram(tuple(sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})))
        self.images = 0  # images answered with 200
        self.in_flight: dict[str, int] = {}  # client address -> requests arrived, not answered (none: absent)
        self.connections_closed: dict[str, int] = {}  # reason -> connections the service closed before a request
        self.accept_errors = 0  # connections that could not be accepted (no file descriptor or memory left)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[route, status] = self.requests.get((route, status), 0) + 1
        self.latency.setdefault(route, Histogram(LATENCY_BOUNDS)).observe(seconds)

    def tasks_answered(self, tasks: list[str], seconds: float) -> None:
        """A prediction answered (200) for these tasks, in ``seconds`` from its arrival."""
        for task in tasks:
            self.task_latency.setdefault(task, Histogram(LATENCY_BOUNDS)).observe(seconds)

    def connection_closed(self, reason: str) -> None:
        self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1

    def text(self) -> str:
        lines = ["# HELP querytune_requests_total Requests answered, by route and status.",
                 "# TYPE querytune_requests_total counter"]
        lines += [f'querytune_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.requests.items())]
        lines += ["# HELP querytune_request_duration_seconds Time from a request's arrival to its answer.",
                  "# TYPE querytune_request_duration_seconds histogram"]
        for route, histogram in sorted(self.latency.items()):
            lines += histogram.lines("querytune_request_duration_seconds", f'route="{route}",')
        lines += ["# HELP querytune_task_requests_total Predictions answered (200), by the task asked for.",
                  "# TYPE querytune_task_requests_total counter"]
        lines += [f'querytune_task_requests_total{{task="{label(task)}"}} {histogram.count}'
                  for task, histogram in sorted(self.task_latency.items())]
        lines += ["# HELP querytune_task_request_duration_seconds Time from arrival to answer of the predictions "
                  "that asked for a task.", "# TYPE querytune_task_request_duration_seconds histogram"]
        for task, histogram in sorted(self.task_latency.items()):
            lines += histogram.lines("querytune_task_request_duration_seconds", f'task="{label(task)}",')
        lines += ["# HELP querytune_batch_images Images in each model call.",
                  "# TYPE querytune_batch_images histogram", *self.batch_images.lines("querytune_batch_images"),
                  "# HELP querytune_images_total Images answered.", "# TYPE querytune_images_total counter",
                  f"querytune_images_total {self.images}",
                  "# HELP querytune_requests_in_flight Requests arrived and not yet answered.",
                  "# TYPE querytune_requests_in_flight gauge",
                  f"querytune_requests_in_flight {sum(self.in_flight.values())}",
                  "# HELP querytune_connections_closed_total Connections closed by the service outside a request, "
                  "by reason.", "# TYPE querytune_connections_closed_total counter"]
        lines += [f'querytune_connections_closed_total{{reason="{reason}"}} {count}'
                  for reason, count in sorted(self.connections_closed.items())]
        lines += ["# HELP querytune_accept_errors_total Connections that could not be accepted (no file "
                  "descriptor or memory left).", "# TYPE querytune_accept_errors_total counter",
                  f"querytune_accept_errors_total {self.accept_errors}"]
        return "\n".join(lines) + "\n"
