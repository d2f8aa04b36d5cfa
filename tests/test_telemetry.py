"""The metric catalogue against Ray's real metric classes (no cluster needed)."""

from serve_app.monitoring import telemetry


def test_metric_catalogue_is_acceptable_to_ray():
    """Every declaration builds as a Ray metric (Ray rejects, e.g., non-positive buckets)."""
    telemetry._objects.cache_clear()
    made = telemetry._objects()
    assert set(made) == set(telemetry.METRICS)


def test_scraped_names_follow_ray_conventions():
    assert telemetry.METRICS["serve_app_requests"].scraped_name == "ray_serve_app_requests_total"
    assert telemetry.METRICS["serve_app_feature_drift_psi"].scraped_name == "ray_serve_app_feature_drift_psi"


def test_counter_increments_are_summed_per_series_until_flushed(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def inc(self, amount, tags):
            seen.append((self.name, amount, tags))

    monkeypatch.setattr(telemetry, "_objects", lambda: {name: Recorder(name) for name in telemetry.METRICS})
    buffer = telemetry._CounterBuffer()
    monkeypatch.setattr(buffer, "_thread", object())  # flushed by hand here, not by its thread
    for _ in range(3):
        buffer.add("serve_app_requests", ("iris", "1", "v2", "200", "ok"))
    buffer.add("serve_app_requests", ("iris", "1", "v2", "400", "client_error"))
    buffer.add("serve_app_predictions", ("iris", "1", "setosa"), 5)
    buffer.flush()
    assert sorted(seen, key=str) == sorted([
        ("serve_app_requests", 3, {"model": "iris", "version": "1", "protocol": "v2", "code": "200", "outcome": "ok"}),
        ("serve_app_requests", 1, {"model": "iris", "version": "1", "protocol": "v2", "code": "400",
                                   "outcome": "client_error"}),
        ("serve_app_predictions", 5, {"model": "iris", "version": "1", "class": "setosa"}),
    ], key=str)
    seen.clear()
    buffer.flush()
    assert seen == []  # each increment is handed to Ray once
