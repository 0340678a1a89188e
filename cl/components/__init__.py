"""Reusable building blocks shared by strategies (class statistics, adapters, buffers...)."""
