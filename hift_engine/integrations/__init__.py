"""Integrations with other training libraries."""
