"""Icons and other package data."""
