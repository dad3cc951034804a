"""The REST API (README, "REST API"; its OpenAPI at /schema)."""
