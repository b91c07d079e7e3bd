"""querytune: parameter- and memory-efficient transfer learning of Vision Transformers."""

from .backbones import load_backbone
from .methods import METHODS, build_method
from .run import eval_run, load_run, train_run
from .serve import MultiTaskServer
from .settings import BenchSpec, RunSpec, Runtime
from .version import __version__

__all__ = ["METHODS", "BenchSpec", "MultiTaskServer", "RunSpec", "Runtime", "__version__", "build_method",
           "eval_run", "load_backbone", "load_run", "train_run"]
