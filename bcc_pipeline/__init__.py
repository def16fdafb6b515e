"""BCC pipeline: breast-cancer image classification (DenseNet201) as a batch system.

The library every Airflow task, the ``bcc`` CLI and the UI call. It never imports Airflow, and
importing it does not import TensorFlow: heavy modules load inside the functions that need them.
"""

from .errors import BCCError

__version__ = "0.1.0"

__all__ = ["BCCError", "__version__"]
