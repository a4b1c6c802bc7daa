"""Test-only helpers shared by the managed-backend tests: a replay HTTP server and an OpenAPI spec checker."""
