"""Where workers run: Docker containers (`docker/`, the only user of the Docker SDK) or local
processes (`local/`), behind the `Backend` protocol of `base`."""
