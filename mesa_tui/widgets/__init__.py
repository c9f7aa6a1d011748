"""Widgets of the terminal app; none of them reads the store."""
