"""cl: continual learning on PyTorch Lightning.

Python entry points (the same code path as ``cl train``)::

    from cl import build_config, train
    results = train(build_config("configs/quickstart.yaml", ["seed=1"]))
    results["last_acc"], results.accuracy_matrix
"""

from cl.config import build_config
from cl.runner import Results, train

__version__ = "0.1.0"
__all__ = ["Results", "build_config", "train", "__version__"]
