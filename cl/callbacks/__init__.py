"""Run-level callbacks: hooks around the experience loop (the Lightning ``Callback`` idea, one level up).

``CALLBACKS`` lists the callback classes the runner instantiates for every run; a class whose
``enabled(cfg)`` is false is skipped. Add a new one by appending to :data:`CALLBACKS` in its own module's import
below, so the runner needs no change.
"""

from cl.callbacks.base import CALLBACKS, CLCallback
from cl.callbacks.flops import FlopsCallback
from cl.callbacks.fpf_addon import DynamicsCallback, FPFAddon
from cl.callbacks.metrics import MetricsCallback

__all__ = ["CALLBACKS", "CLCallback", "DynamicsCallback", "FPFAddon", "FlopsCallback", "MetricsCallback"]
