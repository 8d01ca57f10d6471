"""omniflow: Mini-Omni speech-to-speech models as streaming dataflow graphs."""
from .frame import Frame, FrameError
from .node import CONTROL, Node, NoParams

__all__ = ["CONTROL", "Frame", "FrameError", "Node", "NoParams"]
__version__ = "0.1.0"
