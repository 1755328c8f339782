"""cpjump1: the CPJUMP1 Cell Painting profiling system.

Raw microscope images -> CellProfiler / DeepProfiler features -> pycytominer profiles ->
Percent Replicating / Percent Matching / mAP. Each stage is a plain function
``run_<stage>(...)`` in its own module, reached from pods and local runs alike through the
``cpjump1 <stage>`` command line (see :mod:`cpjump1.cli`).
"""

__version__ = "0.1.0"
