"""The servers the benchmark compares; each module is what its kind of user would write."""
