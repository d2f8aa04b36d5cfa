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
