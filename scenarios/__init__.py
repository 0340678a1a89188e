"""Scenario builders: one file per data set family, registered with ``@register_scenario``."""
