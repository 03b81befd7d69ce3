"""Scaffolding the integration tests share: loopback servers, polling and test certificates.

No tests here; plain helpers (fixtures live in the conftest files and use these).
"""
