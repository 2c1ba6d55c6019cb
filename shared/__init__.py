"""splitexit: edge-cloud split inference with early exits.

Kept light on purpose: importing the package does not import torch, so
`splitexit --help` is quick on a device.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
