"""Strategies: one file each, registered with ``@register_strategy``; modules here are imported on first lookup."""
